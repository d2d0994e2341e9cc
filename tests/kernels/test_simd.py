"""Import-time dispatch and the instructions each path really emits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bitmix.errors import BitmixError
from bitmix.kernels import ACTIVE_PATH, simd

AVX512 = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"})
AMX = AVX512 | {"amx-tile", "amx-int8"}


def test_available_paths_follow_features(monkeypatch) -> None:
    assert simd.available_paths(frozenset()) == ("portable",)
    assert simd.available_paths(frozenset({"avx2", "fma"})) == ("portable", "avx2")
    assert simd.available_paths(AVX512) == ("portable", "avx2", "avx512vnni")
    assert ACTIVE_PATH in simd.available_paths()
    monkeypatch.setattr(simd, "amx_permitted", lambda: True)
    assert simd.available_paths(AMX) == simd.PATHS
    monkeypatch.setattr(simd, "amx_permitted", lambda: False)  # kernel refused the tile state
    assert simd.available_paths(AMX) == ("portable", "avx2", "avx512vnni")


def test_env_forces_path(monkeypatch) -> None:
    monkeypatch.setenv("BITMIX_KERNEL_PATH", "portable")
    assert simd.select_path(AVX512) == "portable"
    monkeypatch.setenv("BITMIX_KERNEL_PATH", "avx512vnni")
    with pytest.raises(BitmixError, match="lacks"):
        simd.select_path(frozenset({"avx2"}))
    monkeypatch.setenv("BITMIX_KERNEL_PATH", "sse9")
    with pytest.raises(BitmixError, match="BITMIX_KERNEL_PATH"):
        simd.select_path(AVX512)
    monkeypatch.delenv("BITMIX_KERNEL_PATH")
    assert simd.select_path(frozenset({"avx2"})) == "avx2"


def test_env_var_at_import() -> None:
    env = {**os.environ, "BITMIX_KERNEL_PATH": "portable"}
    code = "import bitmix.kernels as k; print(k.ACTIVE_PATH)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "portable"


_ASM_PROBE = """
import json, sys
from numba import types
from bitmix.kernels import ACTIVE_PATH
from bitmix.kernels.matmul import micro_kernels
i64, u8, i8 = types.int64, types.uint8[::1], types.int8[::1]
sig = (u8, i64, i64, i64, i64, i8, i64, i64, i64)
res = {"path": ACTIVE_PATH}
for bits in (4, 2, 8):
    d = micro_kernels(sys.argv[1], bits)[0][1]
    d.compile(sig)
    asm = d.inspect_asm(sig)
    res[bits] = {op: asm.count(op) for op in ("vpmaddubsw", "vpmaddwd", "vpdpbusd", "ymm", "zmm")}
print(json.dumps(res))
"""


def _asm_counts(path: str, tmp_path, **env: str) -> dict:
    """Instruction counts of the 1x4 micro-kernels, compiled fresh (cached code cannot be inspected)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", _ASM_PROBE, path], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif("avx2" not in simd.available_paths(), reason="needs AVX2")
def test_avx2_emits_pmaddubsw(tmp_path) -> None:
    """Compiled for Haswell, as on an AVX2-only CPU (on a VNNI host LLVM would fuse vpmaddwd into vpdpwssd)."""
    feats = "+avx,+avx2,+fma,+bmi2,+popcnt,+sse4.2"
    res = _asm_counts("avx2", tmp_path, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=feats)
    for bits in ("4", "2"):
        assert res[bits]["vpmaddubsw"] and res[bits]["vpmaddwd"] and res[bits]["ymm"], res
    assert res["8"]["vpmaddwd"] and not res["8"]["vpmaddubsw"], res  # 8-bit weights must not saturate


def test_avx512_kernel_compiles_to_vpdpbusd(tmp_path) -> None:
    """Compile (never run) the VNNI kernels for Sapphire Rapids, even on a CPU without AVX-512."""
    feats = ",".join(f"+{f}" for f in sorted(AVX512 | {"avx", "fma", "bmi2", "avx512dq", "avx512cd"}))
    res = _asm_counts("avx512vnni", tmp_path, NUMBA_CPU_NAME="sapphirerapids", NUMBA_CPU_FEATURES=feats)
    assert res["path"] == "avx512vnni"
    for bits in ("4", "2", "8"):
        assert res[bits]["vpdpbusd"] and res[bits]["zmm"], res


@pytest.mark.skipif("avx512vnni" not in simd.available_paths(), reason="CPU lacks AVX-512 VNNI")
def test_avx512_runs_here() -> None:
    """Covered by the kernel_path fixture too; this one fails loudly if dispatch skipped VNNI or AMX."""
    best = simd.available_paths()[-1]
    assert ACTIVE_PATH == best or os.environ.get("BITMIX_KERNEL_PATH")
    assert np.int32(0) == 0


_AMX_PROBE = """
import json
from numba import types
from bitmix.kernels import amx
i64, i8, u8, i32 = types.int64, types.int8[::1], types.uint8[::1], types.int32[::1]
f32, b1 = types.float32[::1], types.boolean
sig = (i8, i64, i8, i64, i64, i32, i64, u8, i64, i64, b1, i32, b1, f32, f32, b1, i64, types.float32[:, :, ::1])
d = amx.driver(False)
d.compile(sig)
asm = d.inspect_asm(sig)
print(json.dumps({op: asm.count(op) for op in ("tdpbssd", "tileloadd", "tilestored", "ldtilecfg", "tilerelease")}))
"""


def test_amx_engine_compiles_to_tile_instructions(tmp_path) -> None:
    """Compile (never run) the AMX engine for Sapphire Rapids, even on a CPU without AMX."""
    feats = ",".join(f"+{f}" for f in sorted(AMX | {"avx", "fma", "bmi2", "avx512dq", "avx512cd"}))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_CPU_NAME": "sapphirerapids",
           "NUMBA_CPU_FEATURES": feats}
    out = subprocess.run([sys.executable, "-c", _AMX_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # LLVM may unroll the K loop; every unrolled step is 4 tile loads feeding 4 tdpbssd
    assert res["tdpbssd"] >= 4 and res["tdpbssd"] % 4 == 0 and res["tileloadd"] == res["tdpbssd"], res
    assert res["ldtilecfg"] >= 1 and res["tilerelease"] >= 1, res
    assert res["tilestored"] == 12, res  # int32 output: full blocks direct, edge blocks via scratch; NCHW via scratch


def test_serial_and_parallel_variants_have_their_own_cache_entries() -> None:
    """Numba's disk cache ignores ``parallel=``: two variants of one function must differ in name."""
    from bitmix.kernels import amx, matmul

    pairs = [(amx.driver(True), amx.driver(False)), (matmul._prep_rows, matmul._prep_rows_serial)]
    for par, ser in pairs:
        assert par.targetoptions.get("parallel") and not ser.targetoptions.get("parallel")
        assert par.py_func.__qualname__ != ser.py_func.__qualname__
        assert par.py_func.__code__ is ser.py_func.__code__  # same source, so same results
