"""Import-time dispatch and the instructions each path really emits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from numba import types

from bitmix.errors import BitmixError
from bitmix.kernels import ACTIVE_PATH, simd
from bitmix.kernels.matmul import micro_kernels

AVX512 = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"})
I64 = types.int64
MICRO_SIG = (types.uint8[::1], I64, I64, I64, I64, types.int8[::1], I64, I64)


def test_available_paths_follow_features() -> None:
    assert simd.available_paths(frozenset()) == ("portable",)
    assert simd.available_paths(frozenset({"avx2", "fma"})) == ("portable", "avx2")
    assert simd.available_paths(AVX512) == simd.PATHS
    assert ACTIVE_PATH in simd.available_paths()


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


@pytest.mark.skipif("avx2" not in simd.available_paths(), reason="needs AVX2")
@pytest.mark.parametrize("bits", [4, 2])
def test_avx2_emits_pmaddubsw(bits: int) -> None:
    dot1x4 = micro_kernels("avx2", bits)[0][1]
    asm = dot1x4.inspect_asm(dot1x4.compile(MICRO_SIG).signature)
    for instr in ("vpmaddubsw", "vpmaddwd", "ymm"):
        assert instr in asm


def test_avx512_kernel_compiles_to_vpdpbusd(tmp_path) -> None:
    """Compile (never run) the VNNI kernels for Sapphire Rapids, even on a CPU without AVX-512."""
    feats = ",".join(f"+{f}" for f in sorted(AVX512 | {"avx", "fma", "bmi2", "avx512dq", "avx512cd"}))
    code = """
import json
from numba import types
from bitmix.kernels import ACTIVE_PATH
from bitmix.kernels.matmul import micro_kernels
i64, u8, i8 = types.int64, types.uint8[::1], types.int8[::1]
res = {"path": ACTIVE_PATH}
for bits in (4, 2, 8):
    d = micro_kernels("avx512vnni", bits)[0][1]
    asm = d.inspect_asm(d.compile((u8, i64, i64, i64, i64, i8, i64, i64)).signature)
    res[bits] = [asm.count("vpdpbusd"), asm.count("zmm")]
print(json.dumps(res))
"""
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": "sapphirerapids",
        "NUMBA_CPU_FEATURES": feats,
        "NUMBA_CACHE_DIR": str(tmp_path),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["path"] == "avx512vnni"
    for bits in ("4", "2", "8"):
        assert res[bits][0] > 0 and res[bits][1] > 0, res


@pytest.mark.skipif("avx512vnni" not in simd.available_paths(), reason="CPU lacks AVX-512 VNNI")
def test_avx512_runs_here() -> None:
    """Covered by the kernel_path fixture too; this one fails loudly if dispatch skipped VNNI."""
    assert ACTIVE_PATH == "avx512vnni" or os.environ.get("BITMIX_KERNEL_PATH")
    assert np.int32(0) == 0
