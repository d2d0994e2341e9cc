"""`bitmix study frontier --quick --executor ray` writes the same frontier.json numbers as the local executor."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bitmix.cli import main

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

TIMING = ("_s", "_s_mean", "_s_median", "seconds")  # wall times, which differ run to run
RUN_RECORDS = ("runs", "command", "date", "machine")  # when and how it ran, not what it found


def numbers(value: Any) -> Any:
    """`value` without timings and run records, recursively; `times_*` are ratios of timings."""
    if isinstance(value, dict):
        return {k: numbers(v) for k, v in value.items()
                if k not in RUN_RECORDS and not k.endswith(TIMING) and not k.startswith("times_")}
    if isinstance(value, list):
        return [numbers(v) for v in value]
    return value


def test_study_on_ray_writes_the_same_numbers(tmp_path):
    results = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        assert main(["study", "frontier", "digits-mlp", "--quick", "--executor", executor, "--out", str(out)]) == 0
        results[executor] = json.loads((out / "digits-mlp" / "frontier.json").read_text())
    assert results["ray"]["frontier"]["eagl"]  # there are points to compare
    assert numbers(results["ray"]) == numbers(results["local"])
