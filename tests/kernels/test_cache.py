"""Numba's on-disk cache serves every kernel family to the next process (no recompile per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bitmix.kernels.cpu import available_paths

# Runs every kernel variant of the given paths (``warmup.warm``: tiled GEMM/GEMV, broadcast GEMMs, fused
# linears, NCHW/NHWC/grouped/depthwise convs, bmm, quantize passes, range-search errors), then reports on
# every cached bitmix kernel.
_PROBE = """
import gc, json, sys
from numba.core.caching import NullCache
from numba.core.dispatcher import Dispatcher
from bitmix.kernels import warmup
for path in sys.argv[1:]:
    warmup.warm(path)
kernels = [d for d in gc.get_objects() if isinstance(d, Dispatcher) and d.py_func.__module__.startswith("bitmix")
           and not isinstance(d._cache, NullCache)]
plain = (bool, int, float, str, bytes, type(None))
name = lambda d: f"{d.py_func.__module__}.{d.py_func.__qualname__}"
print(json.dumps({
    "ran": sorted({name(d) for d in kernels if d.overloads}),
    "misses": sorted({name(d) for d in kernels if sum(d.stats.cache_misses.values())}),
    "closures": sorted({name(d) for d in kernels if d.overloads  # inline-only helpers have no entry of their own
                        and any(not isinstance(c.cell_contents, plain) for c in d.py_func.__closure__ or ())}),
}))
"""
_PATHS = [p for p in ("portable", "avx2", "avx512vnni") if p in available_paths()]


def _probe(paths: list[str], **env: str) -> dict:
    env = {**os.environ, **env, "BITMIX_QUIET": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", _PROBE, *paths], env=env, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_kernel_family_loads_from_the_cache_in_a_fresh_process() -> None:
    """On this session's cache (warm after ``make setup`` or the kernel tests): a fresh process must
    load every kernel it runs. A first process may still compile (a cold cache); then a second one
    must not. And no cached kernel may close over anything but plain constants: Numba keys a closure
    by pickling its cells, and a dispatcher there pickles differently once compiled, so the kernel was
    saved under one key and looked up under another (``linear_avx2``'s fused kernel, recompiled in
    every process)."""
    first = _probe(_PATHS)
    assert first["closures"] == []
    families = {n.split(".")[2] for n in first["ran"]}
    assert {"tiling", "broadcast", "conv", "conv_nhwc", "batched", "quant", "range_search"} <= families, families
    assert "avx2" not in _PATHS or {"gemm_avx2", "linear_avx2"} <= families
    assert "avx512vnni" not in _PATHS or {"gemm_vnni", "linear_vnni"} <= families
    if first["misses"]:
        assert _probe(_PATHS)["misses"] == []


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in _PATHS if p != "portable"])
def test_second_process_loads_every_kernel_from_a_cold_cache(path: str, tmp_path) -> None:
    """From an empty cache: the first process compiles and saves every kernel, the second compiles
    none (the closure bug only shows when the saving process compiled the callees itself)."""
    first = _probe([path], NUMBA_CACHE_DIR=str(tmp_path))
    assert first["misses"]  # compiled (and saved) in the first process
    second = _probe([path], NUMBA_CACHE_DIR=str(tmp_path))
    assert second["misses"] == [] and second["ran"] == first["ran"]
