"""Which paths a CPU can run, and BITMIX_KERNEL_PATH forcing one (one-line errors)."""

from __future__ import annotations

import pytest

from bitmix.errors import BitmixError
from bitmix.kernels import cpu

AVX512 = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"})
AMX = AVX512 | {"amx-tile", "amx-int8"}


def test_available_paths_follow_features(monkeypatch) -> None:
    assert cpu.available_paths(frozenset()) == ("portable",)
    assert cpu.available_paths(frozenset({"avx2", "fma"})) == ("portable", "avx2")
    assert cpu.available_paths(AVX512) == ("portable", "avx2", "avx512vnni")
    monkeypatch.setattr(cpu, "amx_permitted", lambda: True)
    assert cpu.available_paths(AMX) == cpu.PATHS
    monkeypatch.setattr(cpu, "amx_permitted", lambda: False)  # kernel refused the tile state
    assert cpu.available_paths(AMX) == ("portable", "avx2", "avx512vnni")


def test_env_forces_path(monkeypatch) -> None:
    monkeypatch.setenv("BITMIX_KERNEL_PATH", " Portable ")
    assert cpu.select_path(AVX512) == "portable"
    monkeypatch.setenv("BITMIX_KERNEL_PATH", "avx512vnni")
    with pytest.raises(BitmixError, match=r"lacks avx512bw, avx512f, avx512vl, avx512vnni; it runs portable, avx2$"):
        cpu.select_path(frozenset({"avx2"}))
    monkeypatch.setenv("BITMIX_KERNEL_PATH", "sse9")
    with pytest.raises(BitmixError, match="BITMIX_KERNEL_PATH='sse9': expected one of") as err:
        cpu.select_path(AVX512)
    assert "\n" not in str(err.value)
    monkeypatch.delenv("BITMIX_KERNEL_PATH")
    assert cpu.select_path(frozenset({"avx2"})) == "avx2"
    assert cpu.select_path(AVX512) == "avx512vnni"


def test_features_from_numba_env(monkeypatch) -> None:
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,-avx512f,+fma")
    assert cpu.cpu_features() == {"avx2", "fma"}
