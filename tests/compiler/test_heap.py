"""`bitmix.compiler.heap`: a compile gives its freed working memory back to the OS, and its warnings still point
at the caller's line although `compile` now wraps its body."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import bitmix
from bitmix.compiler import heap, pipeline

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.mark.skipif(heap._malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_release_returns_the_heaps_free_pages_to_the_os():
    blocks = [bytearray(4000) for _ in range(50_000)]  # 200 MB of small blocks, from the heap (not mmap)
    keep = blocks[::100]  # one live block in every ~400 KB: glibc's own trimming (top of the heap only) cannot act
    del blocks
    before = _rss()
    assert heap.release_freed_memory()
    after = _rss()
    assert before - after > 100 * 2**20, (before, after)
    assert len(keep) == 500


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_compile_releases_freed_memory_once_it_returns_or_fails(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "release_freed_memory", lambda: calls.append(1))
    opts = bitmix.CompileOptions(frontier_points=0)
    bitmix.compile(_model(), torch.randn(8, 16), "int8-npu", data=torch.randn(16, 16), options=opts)
    assert calls == [1]
    with pytest.raises(bitmix.BitmixError, match="seed must be an int"):
        bitmix.compile(_model(), torch.randn(8, 16), "int8-npu", seed="0")  # type: ignore[arg-type]
    assert calls == [1, 1]


def test_compile_warnings_point_at_the_callers_line():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        bitmix.compile(_model(), torch.randn(8, 16), "int8-npu", options=bitmix.CompileOptions(frontier_points=0))
        bitmix.compile(_model(), torch.randn(8, 16), "int8-npu", calibration=torch.randn(16, 16), frontier_points=0)
    messages = {str(w.message).split(":")[0]: w.filename for w in seen}
    assert messages["no calibration data"] == __file__
    assert messages["bitmix.compile"] == __file__  # the deprecation warning
