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


def test_out_of_memory_job_fails_in_one_line():
    # a Ray like a cluster's, with the memory monitor on: any node is above a 1 % threshold, so every
    # attempt is killed; after one OOM retry the job must fail (the executor's own local Ray has no monitor)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, _system_config={
        "memory_usage_threshold": 0.01, "memory_monitor_refresh_ms": 100, "task_oom_retries": 1})
    try:
        with RayExecutor(max_retries=1) as ex, pytest.raises(BitmixError) as info:
            ex.map(_hold_memory, [7], describe=lambda j: f"layer l{j}")
        assert ray.is_initialized()  # a Ray the caller started is left running
    finally:
        ray.shutdown()
    message = str(info.value)
    assert "\n" not in message and message.startswith("job layer l7 was killed by Ray's memory monitor"), message
