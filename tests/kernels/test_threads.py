"""The threading layer the kernels get: TBB when installed, the user's choice when set."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

_PROBE = """
import numpy as np, numba
from bitmix.kernels import dispatch, gemm, pack_weights
from bitmix.kernels.threads import configure_threading
with dispatch.use(serial=False):
    gemm(np.ones((4, 64), np.int8), pack_weights(np.ones((8, 64), np.int8), 4), 8, True)
print(configure_threading(), numba.threading_layer())
"""


def _layers(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**base, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def _tbb_installed() -> bool:
    try:
        importlib.metadata.version("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_default_layer() -> None:
    want = "tbb" if _tbb_installed() else "workqueue"
    assert _layers() == [want, want]


@pytest.mark.parametrize("layer", ["workqueue", "omp", "tbb"])
def test_user_choice_wins(layer: str) -> None:
    if layer == "tbb" and not _tbb_installed():
        pytest.skip("the tbb distribution is not installed")
    assert _layers(NUMBA_THREADING_LAYER=layer) == [layer, layer]


def test_safe_layer_finds_the_installed_tbb() -> None:
    """``safe`` picks TBB; a virtualenv's TBB is not on the loader path, so it must be loaded for it."""
    if not _tbb_installed():
        pytest.skip("the tbb distribution is not installed")
    assert _layers(NUMBA_THREADING_LAYER="safe") == ["safe", "tbb"]


_COUNTS = """
import threading, numba
from bitmix.kernels.threads import configure_threading, thread_count
seen = [thread_count() == numba.get_num_threads()]  # before the pool starts
configure_threading()
for n in (1, numba.config.NUMBA_NUM_THREADS, 1):
    numba.set_num_threads(n)
    seen.append(thread_count() == numba.get_num_threads() == n)
other = []
t = threading.Thread(target=lambda: other.append(thread_count() == numba.get_num_threads()))
t.start(); t.join()
print(all(seen + other))
"""


def test_thread_count_follows_set_num_threads() -> None:
    out = subprocess.run([sys.executable, "-c", _COUNTS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True"]
