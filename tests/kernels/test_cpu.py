"""Which paths a CPU can run, and BITMIX_KERNEL_PATH forcing one (one-line errors)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

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


_DENIED = """
import ctypes, errno, json
from bitmix.kernels import cpu
cpu.deny_amx()
libc = ctypes.CDLL(None, use_errno=True)
refused = libc.syscall(158, 0x1023, 18) == -1 and ctypes.get_errno() == errno.EPERM
print(json.dumps({"refused": refused, "paths": cpu.available_paths(), "granted": cpu.amx_granted(),
                  "permitted": cpu.amx_permitted()}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="AMX is Linux x86_64's")
def test_deny_amx_makes_the_process_a_cpu_without_amx() -> None:
    """After ``deny_amx`` every request for the tile state fails with EPERM (whatever the CPU has), the AMX path is
    gone, and the rest of the process runs on."""
    out = subprocess.run([sys.executable, "-c", _DENIED], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["refused"] and not got["granted"] and not got["permitted"]
    assert "avx512amx" not in got["paths"] and got["paths"][0] == "portable"


def test_deny_amx_after_a_grant_is_a_one_line_error(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "amx_granted", lambda: True)
    with pytest.raises(BitmixError, match=r"^AMX is already in use in this process; deny it before .*fresh process\)$"):
        cpu.deny_amx()
