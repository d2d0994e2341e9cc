"""Numba's on-disk cache serves the conv GEMM core to the next process (no recompile per process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bitmix.kernels.cpu import available_paths

_PROBE = """
import numpy as np, torch
from torch import nn
import bitmix
from bitmix.kernels import gemm_vnni
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1)).eval()
x = torch.randn(2, 8, 6, 6)
cm = bitmix.compile(net, x, target="int8-npu", budget=1.0, data=x, options=bitmix.CompileOptions(frontier_points=0))
cm(x)
d = gemm_vnni.driver()
print(sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()))
"""


@pytest.mark.slow
@pytest.mark.skipif("avx512vnni" not in available_paths(), reason="needs the AVX-512 VNNI path")
def test_second_process_loads_the_vnni_conv_core_from_the_cache(tmp_path) -> None:
    """The core was a closure over helper dispatchers that pickle differently once compiled, so every
    process looked it up under one key and saved it under another: ~50 s of compile per process."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "BITMIX_KERNEL_PATH": "avx512vnni",
           "BITMIX_QUIET": "1", "PYTHONWARNINGS": "ignore"}

    def run() -> list[int]:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
        return [int(v) for v in out.stdout.split()[-2:]]

    first, second = run(), run()
    assert first[1] >= 1  # compiled (and saved) in the first process
    assert second == [first[1], 0]  # every compiled signature loaded, none recompiled
