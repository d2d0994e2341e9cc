"""Kernel dispatch as an object: chosen at the first kernel call, overridden per block, validated."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from bitmix.errors import BitmixError
from bitmix.kernels import dispatch, gemm, launch, pack_weights, reference, tiling
from bitmix.kernels.cpu import PATHS, available_paths
from bitmix.kernels.routing import DispatchSettings, KernelDispatch

_LAZY_PROBE = """
import sys
import bitmix
assert "numba" not in sys.modules, "import bitmix loaded numba"
from bitmix import kernels
assert kernels.dispatch._defaults is None, "a path was chosen at import"
print(kernels.dispatch.path)
assert "numba" not in sys.modules, "choosing the path loaded numba"
import numpy as np
kernels.gemm(np.ones((2, 64), np.int8), kernels.pack_weights(np.ones((3, 64), np.int8), 4), 8, True)
assert "numba" in sys.modules
"""


def _probe(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LAZY_PROBE], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)


def test_import_bitmix_loads_no_numba_the_first_kernel_call_does() -> None:
    out = _probe()
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [available_paths()[-1] if not os.environ.get("BITMIX_KERNEL_PATH")
                                  else os.environ["BITMIX_KERNEL_PATH"].strip().lower()]


def test_env_var_chooses_the_path_at_first_use() -> None:
    out = _probe(BITMIX_KERNEL_PATH="portable")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["portable"]


def test_env_var_error_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv("BITMIX_KERNEL_PATH", "sse9")
    fresh = KernelDispatch()  # the shared one has chosen already
    with pytest.raises(BitmixError, match="BITMIX_KERNEL_PATH='sse9'") as err:
        _ = fresh.path
    assert "\n" not in str(err.value)


def test_default_is_the_fastest_path(monkeypatch) -> None:
    monkeypatch.delenv("BITMIX_KERNEL_PATH", raising=False)
    assert KernelDispatch().path == available_paths()[-1]


def test_use_overrides_and_restores() -> None:
    before = dispatch.settings
    with dispatch.use("portable", serial=True, amx_min_macs=0) as s:
        assert s == dispatch.settings == DispatchSettings("portable", True, before.amx_min_m, 0,
                                                          before.torch_one_thread)
        with dispatch.use(serial=None):  # nested: only the named field changes
            assert (dispatch.path, dispatch.settings.serial, dispatch.settings.amx_min_macs) == ("portable", None, 0)
        assert dispatch.settings.serial is True
    assert dispatch.settings == before
    with pytest.raises(ValueError), dispatch.use("portable"):
        raise ValueError
    assert dispatch.settings == before


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"path": "sse9"}, "path='sse9': expected one of portable, avx2, avx512vnni, avx512amx"),
    ({"path": 3}, "path=3: expected one of"),
    ({"serial": "yes"}, "serial='yes': expected True"),
    ({"amx_min_macs": -1}, "amx_min_macs=-1: expected a non-negative int"),
    ({"torch_one_thread": 1}, "torch_one_thread=1: expected a bool"),
])
def test_use_rejects_bad_settings_in_one_line(kwargs: dict, message: str) -> None:
    before = dispatch.settings
    with pytest.raises(BitmixError, match=message) as err, dispatch.use(**kwargs):
        pass
    assert "\n" not in str(err.value)
    assert dispatch.settings == before


@pytest.mark.skipif(len(available_paths()) == len(PATHS), reason="this CPU runs every path")
def test_use_rejects_a_path_this_cpu_cannot_run() -> None:
    missing = PATHS[len(available_paths())]
    with pytest.raises(BitmixError, match=f"path='{missing}': this CPU lacks"), dispatch.use(missing):
        pass


def test_override_is_per_thread() -> None:
    seen = {}
    with dispatch.use("portable", serial=True):
        worker = threading.Thread(target=lambda: seen.update(settings=dispatch.settings))
        worker.start()
        worker.join()
        assert dispatch.path == "portable"
    assert seen["settings"] == dispatch.settings  # the other thread saw the defaults


def test_configure_changes_the_defaults(monkeypatch) -> None:
    monkeypatch.delenv("BITMIX_KERNEL_PATH", raising=False)
    fresh = KernelDispatch()
    assert fresh.configure("portable", serial=False).path == "portable"
    assert fresh.settings == DispatchSettings("portable", serial=False)
    assert fresh.configure(serial=None).serial is None and fresh.path == "portable"
    with pytest.raises(BitmixError, match="path='x'"):
        fresh.configure("x")
    assert fresh.path == "portable"


@pytest.mark.parametrize(("path", "serial"), [("avx2", False), ("avx512vnni", True)])
def test_products_run_on_the_chosen_driver(monkeypatch, path: str, serial: bool) -> None:
    if path not in available_paths():
        pytest.skip(f"CPU cannot run {path}")
    drivers = []
    monkeypatch.setattr(launch, "core_for", lambda *key: drivers.append(key) or tiling.core_for(*key))
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, (5, 70), dtype=np.int8)
    a = rng.integers(-128, 128, (3, 70), dtype=np.int8)
    with dispatch.use(path, serial=serial):
        np.testing.assert_array_equal(gemm(a, pack_weights(w, 4), 8, True), reference.gemm(a, w))
    assert drivers == [(4, path, not serial)]


@pytest.mark.parametrize("groups", [1, 3])
def test_portable_products_run_exactly_on_float_blas(monkeypatch, groups: int) -> None:
    """The portable path's products of 4 rows or more go to ``gemm_float`` (not the scalar tiled driver),
    bit-exact; a large K at 8-bit weights takes float64 (float32 would round partial sums above 2^24)."""
    calls, drivers = [], []
    monkeypatch.setattr(launch, "core_for", lambda *key: drivers.append(key) or tiling.core_for(*key))
    real = launch.gemm_float.run
    monkeypatch.setattr(launch.gemm_float, "run", lambda *args: calls.append(args[1].bits) or real(*args))
    rng = np.random.default_rng(groups)
    for bits, k in ((4, 70), (8, 4000), (2, 9)):
        lim = 1 << (bits - 1)
        w = rng.integers(-lim, lim, (6, k), dtype=np.int8)
        a = rng.integers(0, 256, (5, k * groups)).astype(np.int64)
        w_all = np.concatenate([w] * groups) if groups > 1 else w
        packed = pack_weights(w_all, bits)
        if groups == 1:
            with dispatch.use("portable"):
                got = gemm(a, packed, 8, False)
            np.testing.assert_array_equal(got, reference.gemm(a, w))
        else:
            a8 = np.zeros((groups, 8, packed.k_pad), dtype=np.int8)
            asum = np.zeros(groups * 8, dtype=np.int64)
            for g in range(groups):
                a8[g, :5, :k] = a[:, g * k:(g + 1) * k] - 128
            out = np.empty((5, 6 * groups), dtype=np.int32)
            with dispatch.use("portable"):
                launch.run_core(a8.reshape(-1), asum, packed, 128, groups, 5, 8, out)
            want = np.concatenate([reference.gemm(a[:, g * k:(g + 1) * k], w) for g in range(groups)], axis=1)
            np.testing.assert_array_equal(out, want)
    assert calls == [4, 8, 2] and drivers == []
    with dispatch.use("portable", serial=True):  # a GEMV keeps the packed loops (no float copy)
        w = rng.integers(-8, 8, (6, 70), dtype=np.int8)
        a = rng.integers(-128, 128, (1, 70), dtype=np.int8)
        np.testing.assert_array_equal(gemm(a, pack_weights(w, 4), 8, True), reference.gemm(a, w))
    assert calls == [4, 8, 2] and drivers == [(4, "portable", False)]
    assert launch.gemm_float._dtype(pack_weights(np.zeros((1, 4000), np.int8), 8)) == torch.float64


@pytest.mark.skipif("avx512amx" not in available_paths(), reason="CPU lacks AMX (or the kernel refused it)")
def test_amx_path_routes_strided_convs_and_few_row_linears_to_vpdpbusd() -> None:
    """On ``avx512amx`` strided one-group convs take the vpdpbusd implicit GEMM (``test_conv_amx``: the stride-1
    ones) and lowered linears the fused tile kernel from 16 rows and 2^20 MACs (measured in ``routing.py``)."""
    from bitmix.kernels import conv_nhwc, gemm_vnni

    rng = np.random.default_rng(0)
    small = pack_weights(rng.integers(-8, 8, (384, 384)).astype(np.int8), 4)
    large = pack_weights(rng.integers(-8, 8, (1024, 1024)).astype(np.int8), 4)
    tiny = pack_weights(rng.integers(-8, 8, (32, 64)).astype(np.int8), 4)
    with dispatch.use("avx512amx") as s:
        assert conv_nhwc.implicit_route(small, 784, (1, 1, 2, 2, 0, 0, 1, 1, 1, 28, 28)) is gemm_vnni  # strided
        assert s.engine(small, 64, 1, fused=True) == "amx"  # MiniLM's 64 x 384 x 384
        assert s.engine(large, 16, 1, fused=True) == "amx"
        assert s.engine(large, 8, 1, fused=True) == "avx512vnni"  # fewer rows than a tile
        assert s.engine(tiny, 64, 1, fused=True) == "avx512vnni"  # 131k MACs: the engine's fixed cost
    with dispatch.use("avx512amx", amx_fused_min_m=128) as s:  # the crossover is a setting
        assert s.engine(small, 64, 1, fused=True) == "avx512vnni"
        assert s.engine(small, 64, 1) == "amx"  # a product on codes keeps ``amx_min_m``
