"""Which Numba threading layer runs the kernels' ``prange`` loops.

bitmix alternates torch ops and short kernels, so the cost of starting a parallel loop
matters as much as the loop. Measured on a 2-vCPU Sapphire Rapids VM (median of 50
launches of an empty ``prange`` loop; worst case over 200 launches, each right after a
512x512 ``torch.mm``):

* ``workqueue``: 120-150 us per launch (its threads sleep and are woken every time).
* ``omp``: 6 us, 11 us after a torch op, but worst 4.4 ms: Numba's libgomp and the one
  torch bundles are two separate spinning pools that take turns for the cores (a 2-core
  Zen 3 machine showed the same as 0.4 -> 16 ms).
* ``tbb``: 1.4 us back to back, 19 us after a torch op, worst 79 us.

So TBB is the default. The ``tbb`` wheel puts ``libtbb.so.12`` in ``<prefix>/lib``, which
is not on the loader path of a virtualenv, so it is loaded here by its installed location
before Numba's ``tbbpool`` needs it. Without a loadable TBB we fall back to ``workqueue``
(never a spinning pool). ``NUMBA_THREADING_LAYER`` set by the user always wins; the TBB library is
loaded for it too (``tbb``, or ``safe`` and ``threadsafe``, which pick TBB first), else Numba finds no
TBB in a virtualenv and stops with "No threading layer could be loaded".
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os

import numba
from numba.np.ufunc import parallel

_TBB_LIBRARY = "libtbb.so.12"


def _tbb_library() -> str | None:
    """Path of the ``libtbb`` shipped by the installed ``tbb`` distribution, if any."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == _TBB_LIBRARY:
            path = str(f.locate())
            if os.path.exists(path):
                return path
    return None


def _start_tbb(lib: str) -> bool:
    """Load ``lib`` and start Numba's TBB pool; False if either step fails (wrong or broken TBB)."""
    try:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        numba.config.THREADING_LAYER = "tbb"
        parallel._launch_threads()
    except (OSError, ValueError, ImportError):
        return False
    return True


@functools.cache
def configure_threading() -> str:
    """Pick the layer (see module docstring) before Numba's first parallel launch; return it.

    Called once per process by the kernel modules as they load (``simd``, ``batched``), i.e. at
    the first kernel call, never by ``import bitmix``.
    """
    if parallel._is_initialized:
        return numba.threading_layer()
    lib = _tbb_library()
    chosen = os.environ.get("NUMBA_THREADING_LAYER")
    if chosen:
        if lib is not None and chosen in ("tbb", "safe", "threadsafe", "default"):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass  # Numba then reports the layer it cannot load, in its own words
        return chosen
    if lib is not None and _start_tbb(lib):
        return "tbb"
    numba.config.THREADING_LAYER = "workqueue"
    return "workqueue"


def thread_count() -> int:
    """``numba.get_num_threads()`` without its two process locks once the pool is up (0.8 us a call, made once
    per lowered layer call): the calling thread's count, as ``numba.set_num_threads`` set it."""
    if parallel._is_initialized:
        return parallel._get_num_threads()
    return numba.get_num_threads()
