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
    kernels = {"tiling", "broadcast", "conv", "conv_nhwc", "batched", "quant", "range_search", "linear_gemv"}
    assert kernels <= families, families
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


# Warm-up, then what a compile, a loaded model and the kernels' own callers run; prints the kernel signatures they
# needed that warm-up had not built (each one a cold compile in the first call that meets it: ~40 s for
# ``_code_matmul``). ``a`` of the attention products is a transposed activation: column-major ('F') at batch 1.
_AFTER_WARMUP = """
import gc, json, sys, warnings
import numpy as np, torch
from numba.core.dispatcher import Dispatcher
from bitmix.kernels import warmup
warnings.simplefilter("ignore")
warmup.warm()

def built():
    return {f"{d.py_func.__module__}.{d.py_func.__qualname__}": set(map(str, d.signatures)) for d in gc.get_objects()
            if isinstance(d, Dispatcher) and d.py_func.__module__.startswith("bitmix")}

warm = built()
import bitmix
from bitmix.kernels import bmm
from bitmix.kernels.code_matmul import code_matmul

class Mixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
    def forward(self, x):
        h = self.a(x)
        return self.b(((h.transpose(1, 2) @ h).softmax(-1) @ h.transpose(1, 2)).transpose(1, 2))

torch.manual_seed(0)
x = torch.randn(4, 16, 32)
cm = bitmix.compile(Mixer().eval(), (x,), "int4int2-npu", options=bitmix.CompileOptions(frontier_points=0))
cm(x[:1])
loaded = bitmix.load(cm.save(sys.argv[1]))
loaded(x[:1]), loaded(x)
rng = np.random.default_rng(0)
a, b = rng.normal(size=(3, 6, 5)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
for floor in (1e-8, None):
    code_matmul(a[:1].transpose(0, 2, 1), a[:1], 0.1, 0.1, floor, (-8, 7), (-8, 7))  # 'F' operands
    code_matmul(a, b, 0.1, 0.1, floor, (-8, 7), (-8, 7))  # b broadcast over a's batch
    code_matmul(a, np.asfortranarray(a[:, :5, :1]), 0.1, 0.1, floor, (-8, 7), (-8, 7))
for a_type in (np.int8, np.uint8):  # read-only codes
    bmm(np.broadcast_to(rng.integers(0, 8, (1, 5, 7)).astype(a_type), (2, 5, 7)),
        np.broadcast_to(rng.integers(0, 8, (7, 4)).astype(np.int8), (2, 7, 4)))
print(json.dumps({k: sorted(v - warm.get(k, set())) for k, v in built().items() if v - warm.get(k, set())}))
"""


def test_warmup_builds_every_kernel_signature_a_compile_and_a_loaded_model_run(tmp_path) -> None:
    """After ``python -m bitmix.kernels.warmup`` a compile cold-built ``_code_matmul`` for a column-major operand
    (39.5 s in its fidelity stage) and the chain solver's ``lagrange_path`` (5.1 s, in allocate), and a loaded
    attention model's first call ``_bmm`` for read-only int8 and uint8 codes (3.25 s): the callers now hand the
    kernels one layout (contiguous or strided, writable) and warm-up builds the rest."""
    env = {**os.environ, "BITMIX_QUIET": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", _AFTER_WARMUP, str(tmp_path / "m.pt2")], env=env, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
