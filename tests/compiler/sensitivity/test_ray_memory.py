"""A job that Ray's memory monitor keeps killing ends in one line naming it, instead of being retried forever."""

from __future__ import annotations

import sys
import time

import pytest

from bitmix.errors import BitmixError

ray = pytest.importorskip("ray")
from bitmix.compiler.sensitivity.ray_executor import RayExecutor  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
pytestmark = pytest.mark.slow


def _hold_memory(job: int) -> int:
    block = bytearray(64 * 2**20)  # touched, so it counts as used
    time.sleep(5)
    return job + len(block) * 0


def test_out_of_memory_job_fails_in_one_line(monkeypatch):
    # any node is above a 1 % threshold: the monitor kills every attempt (read by the raylet at start)
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.01")
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "100")
    assert not ray.is_initialized()
    with RayExecutor(workers=1, max_retries=1) as ex, pytest.raises(BitmixError) as info:
        ex.map(_hold_memory, [7], describe=lambda j: f"layer l{j}")
    assert not ray.is_initialized()
    message = str(info.value)
    assert "\n" not in message and message.startswith("job layer l7 was killed by Ray's memory monitor"), message
