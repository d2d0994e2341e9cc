"""Shared fixtures: run kernel tests on every path this CPU can execute."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from bitmix.kernels import dispatch
from bitmix.kernels.cpu import PATHS, available_paths
from bitmix.kernels.pack import code_range


@pytest.fixture(params=[(p, d) for p in PATHS for d in ("serial", "parallel")], ids="-".join)
def kernel_path(request) -> Iterator[str]:
    """Force one dispatch path and driver (serial, or prange over tiles whatever the size);
    skip paths this CPU cannot execute (e.g. AVX-512 VNNI on Zen 3). On ``avx512amx`` every
    product with enough rows goes to the tile engine, however few its MACs, lowered linears too."""
    path, driver = request.param
    if path not in available_paths():
        pytest.skip(f"CPU cannot run the {path} path")
    with dispatch.use(path, serial=driver == "serial", amx_min_macs=0, amx_fused_min_m=0, amx_fused_min_macs=0,
                      amx_conv_min_macs=0):
        yield path


def random_codes(rng: np.random.Generator, shape, bits: int, signed: bool = True, fill: str = "random"):
    """Codes of the given width; ``fill`` = random | min | max for the extreme cases."""
    lo, hi = code_range(bits, signed)
    if fill == "min":
        return np.full(shape, lo, dtype=np.int16)
    if fill == "max":
        return np.full(shape, hi, dtype=np.int16)
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(np.int16)
