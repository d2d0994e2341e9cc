"""The instructions each path's kernels really emit, and their Numba cache keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bitmix.kernels.cpu import available_paths

AVX512 = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"})
AMX = AVX512 | {"amx-tile", "amx-int8"}


_ASM_PROBE = """
import json, sys
from numba import types
from bitmix.kernels import dispatch
from bitmix.kernels.isa import micro_kernels
i64, u8, i8 = types.int64, types.uint8[::1], types.int8[::1]
sig = (u8, i64, i64, i64, i64, i8, i64, i64, i64)
res = {"path": dispatch.path}
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


@pytest.mark.skipif("avx2" not in available_paths(), reason="needs AVX2")
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
    """Numba's disk cache ignores ``parallel=``: two variants of one function must differ in name
    (``simd.cache_variant``) or in their closure (which the cache key pickles)."""
    from bitmix.kernels import amx, matmul, tiling

    pairs = [(amx.driver(True), amx.driver(False)), (matmul._prep_rows, matmul._prep_rows_serial)]
    for par, ser in pairs:
        assert par.targetoptions.get("parallel") and not ser.targetoptions.get("parallel")
        assert par.py_func.__qualname__ != ser.py_func.__qualname__
        assert par.py_func.__code__ is ser.py_func.__code__  # same source, so same results
    for isa in ("portable", "avx2", "avx512vnni"):
        par, ser = tiling.core_for(4, isa, True), tiling.core_for(4, isa, False)
        assert par.targetoptions.get("parallel") and not ser.targetoptions.get("parallel")
        cells = [tuple(c.cell_contents for c in d.py_func.__closure__) for d in (par, ser)]
        assert cells[0] != cells[1]  # same micro-kernels, different tile width


_BCAST_PROBE = """
import json
from numba import types
from bitmix.kernels import gemm_vnni
i64, a64, i32, f32 = types.int64, types.int64[::1], types.int32[::1], types.float32[::1]
sig = (types.int8[::1], a64, a64, a64, types.uint8[::1], i32, *[i64] * 6, a64, i64, i32, f32, f32, f32, f32,
       types.float32, types.float32, types.int8[::1], a64, f32)
res = {}
for name, d in (("floats", gemm_vnni.driver()), ("codes", gemm_vnni.driver(codes=True))):
    d.compile(sig)
    asm = d.inspect_asm(sig)
    res[name] = {op: asm.count(op) for op in ("vpdpbusd", "vpbroadcastd", "zmm", "vcvtdq2ps", "vcvtps2dq")}
print(json.dumps(res))
"""


def test_broadcast_gemm_compiles_to_vpdpbusd_with_broadcasts(tmp_path) -> None:
    """The register-blocked GEMM (``gemm_vnni``, both epilogue variants) keeps its 4x4 zmm tile: vpdpbusd fed by
    broadcast activations."""
    feats = ",".join(f"+{f}" for f in sorted(AVX512 | {"avx", "fma", "bmi2", "avx512dq", "avx512cd"}))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_CPU_NAME": "sapphirerapids",
           "NUMBA_CPU_FEATURES": feats}
    out = subprocess.run([sys.executable, "-c", _BCAST_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for variant in res.values():
        assert variant["vpdpbusd"] >= 16 and variant["vpbroadcastd"] and variant["zmm"], res
        assert variant["vcvtdq2ps"], res  # the dequantizing epilogue is vectorised too
    assert res["codes"]["vcvtps2dq"], res  # ... and the one quantizing for the next conv (CODES)


_AVX2_BCAST_PROBE = """
import json
import numpy as np
from bitmix.kernels import gemm_avx2, pack_weights
res = {}
for bits in (8, 4):
    w = pack_weights(np.ones((16, 64), dtype=np.int8), bits)
    out = np.empty((4, 16), dtype=np.int32)
    gemm_avx2.run(np.zeros(4 * w.k_pad, dtype=np.int8), np.zeros(4, dtype=np.int64), w, 0, 4, out, False)
    asm = "".join(gemm_avx2.driver(bits == 8, False).inspect_asm().values())
    res[bits] = {op: asm.count(op) for op in ("vpmaddubsw", "vpmaddwd", "vpbroadcastd", "vpsraw")}
print(json.dumps(res))
"""


@pytest.mark.skipif("avx2" not in available_paths(), reason="needs AVX2")
def test_avx2_broadcast_gemm_multiplies_8_bit_weights_in_16_bits(tmp_path) -> None:
    """``gemm_avx2``'s 8-bit-weight tile widens both operands to 16 bits for ``vpmaddwd`` (two multiplies per K
    step and 8 channels; the nibble split it replaced took four, two of them ``vpmaddubsw``); narrower weights
    keep ``vpmaddubsw``. Compiled for Haswell, as on an AVX2-only CPU."""
    feats = "+avx,+avx2,+fma,+bmi2,+popcnt,+sse4.2"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": feats}
    out = subprocess.run([sys.executable, "-c", _AVX2_BCAST_PROBE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert not res["8"]["vpmaddubsw"] and res["8"]["vpmaddwd"] >= 16 and res["8"]["vpsraw"] >= 8, res
    assert res["8"]["vpbroadcastd"] >= 4, res
    assert res["4"]["vpmaddubsw"] >= 8, res
