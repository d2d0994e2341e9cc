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


def test_buffers_and_weight_layouts_start_on_a_cache_line() -> None:
    from bitmix.kernels import amx, broadcast
    from bitmix.kernels.pack import pack_weights
    from bitmix.kernels.scratch import LINE, aligned_copy, aligned_empty

    w = pack_weights(np.ones((40, 72), dtype=np.int8), 4)
    arrays = [scratch("test.aligned", n, np.int8) for n in (3, 1000, 1 << 20)]
    arrays += [aligned_empty((5, 7), np.float32), aligned_copy(np.arange(33.0).reshape(3, 11).T), w.data,
               broadcast.weight_blocks(w).data, amx.weight_tiles(w)]
    for a in arrays:
        assert a.ctypes.data % LINE == 0 and a.flags.c_contiguous
    np.testing.assert_array_equal(aligned_copy(np.arange(33.0).reshape(3, 11).T), np.arange(33.0).reshape(3, 11).T)
