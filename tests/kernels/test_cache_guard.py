"""A change to any kernel source drops Numba's cached kernels once; an unchanged tree keeps them."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitmix.kernels import cache_guard


def _tree(root: Path) -> tuple[Path, Path]:
    (root / "isa" / "__pycache__").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / "gemm.py").write_text("def core(): pass\n")
    (root / "isa" / "simd.py").write_text("X = 1\n")
    index, data = root / "__pycache__" / "gemm.core-3.py311.nbi", root / "isa" / "__pycache__" / "simd.f-1.py311.1.nbc"
    return index, data


def test_a_source_change_drops_the_cache_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    index, data = _tree(tmp_path)
    keep = tmp_path / "__pycache__" / "gemm.cpython-311.pyc"  # Python's own bytecode is not Numba's to drop
    for f in (index, data, keep):
        f.write_bytes(b"x")
    assert cache_guard.drop_stale(tmp_path) == 2  # no stamp yet: the cache's provenance is unknown
    assert not index.exists() and not data.exists() and keep.exists()
    index.write_bytes(b"x")  # compiled again from these sources
    assert cache_guard.drop_stale(tmp_path) == 0 and index.exists()
    (tmp_path / "isa" / "simd.py").write_text("X = 2\n")  # an edit to a callee's file
    assert cache_guard.drop_stale(tmp_path) == 1 and not index.exists()
    assert (tmp_path / "__pycache__" / cache_guard.STAMP).read_text() == cache_guard.source_digest(tmp_path)


def test_a_cache_kept_elsewhere_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    index, _ = _tree(tmp_path)
    index.write_bytes(b"x")
    assert cache_guard.drop_stale(tmp_path) == 0 and index.exists()
