"""Per-thread scratch buffers: a repeated request returns the same view; a larger one grows the slot."""

from __future__ import annotations

import threading

import numpy as np

from bitmix.kernels.scratch import scratch


def test_scratch_reuses_a_slot_and_grows_it() -> None:
    a = scratch("test.slot", (4, 8), np.int8)
    assert scratch("test.slot", (4, 8), np.int8) is a
    b = scratch("test.slot", 1000, np.int64)
    assert b.shape == (1000,) and b.dtype == np.int64 and b.flags.c_contiguous
    c = scratch("test.slot", (2, 3), np.float32)
    assert c.shape == (2, 3) and np.shares_memory(b, c)


def test_threads_get_their_own_buffers() -> None:
    mine = scratch("test.thread", 64, np.int8)
    theirs: list[np.ndarray] = []
    t = threading.Thread(target=lambda: theirs.append(scratch("test.thread", 64, np.int8)))
    t.start()
    t.join()
    assert not np.shares_memory(mine, theirs[0])
