"""Per-thread scratch buffers for kernel intermediates (im2col bytes, int32 accumulators).

A fresh multi-megabyte ``np.empty`` is often fresh memory from the OS: glibc returns large
freed blocks, so the next call page-faults on every 4 KiB it touches. On the 2-vCPU VM,
a 1x1 conv of 64 -> 256 channels at 56x56 took 2.2 ms with fresh intermediates against 0.7 ms
with reused ones. Buffers here are reused per thread and grow to the
largest request; a returned view is valid until the same slot is requested again on the
same thread.

Buffers start on a cache line (``aligned_empty``), as do the weight layouts the kernels build: numpy's
allocations start 16 bytes into one, so every 64-byte vector or tile row read from them spans two lines.
On Sapphire Rapids the AMX tile GEMM 64 x 1536 x 384 took 70.4 us (one thread) with activations and weights
both 16 bytes off a line, 32.4 us with both on one (256 x 1024 x 1024: 566 -> 304 us).
"""

from __future__ import annotations

import math
import threading

import numpy as np

_LOCAL = threading.local()
LINE = 64  # bytes: a cache line, one zmm, one AMX tile row


def aligned_empty(shape: int | tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a cache line (``LINE`` bytes)."""
    dt = np.dtype(dtype)
    count = shape if isinstance(shape, int) else math.prod(shape)
    buf = np.empty(count * dt.itemsize + LINE, dtype=np.uint8)
    start = -buf.ctypes.data % LINE
    return buf[start:start + count * dt.itemsize].view(dt).reshape(shape)


def aligned_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` starting on a cache line."""
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def scratch(slot: str, shape: int | tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised C-contiguous array backed by this thread's buffer for ``slot``."""
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = {}
    last = pool.get(slot)
    if last is not None and last[1] == shape and last[2] is dtype:  # a layer asks again: ~2 us of views saved
        return last[3]
    dt = np.dtype(dtype)
    count = shape if isinstance(shape, int) else math.prod(shape)  # np.prod costs ~5 us a call
    nbytes = count * dt.itemsize
    buf = None if last is None else last[0]
    if buf is None or buf.nbytes < nbytes:
        buf = aligned_empty(max(nbytes, LINE), np.uint8)
    view = buf[:nbytes].view(dt).reshape(shape)
    pool[slot] = (buf, shape, dtype, view)
    return view
