"""frontier.json summaries: what each aggregated field counts."""

from __future__ import annotations

import pytest

from bitmix.ir.precision import Precision
from bitmix.ir.targets import get_target
from bitmix.study.config import default_config, references
from bitmix.study.stats import summarise


def _point(method: str, assignment: dict, budget: float | None = 0.9) -> dict:
    return {"method": method, "seed": 0, "budget": budget, "status": "ok", "assignment": assignment, "quality": 90.0,
            "throughput_fps": 1e6, "energy_per_frame_j": 1e-6, "fraction": 0.9}


@pytest.mark.parametrize(("study", "low", "high"), [("digits-cnn-ptq-w4a8", Precision(2, 8), Precision(4, 8)),
                                                     ("digits-cnn-ptq", 2, 4)])
def test_lowered_layers_count_the_targets_lowest_choice(study, low, high):
    """On w4a8-npu the lowest choice is 2/8 (never equal to the int 2): it was counted as 0 layers lowered."""
    config = default_config(study, methods=["eagl"], budgets=[0.9], seeds=1)
    mixed = {"stem": Precision(8, 8), "a": low, "b": low, "c": high, "fc": Precision(8, 8)}
    all_low = references(get_target(config.target))[-1][0]  # all-2 or all-2/8
    result = summarise(config, [_point("eagl", mixed), _point(all_low, mixed | {"c": low}, None)], {}, {})
    assert result["frontier"]["eagl"][0]["lowered_layers_mean"] == 2
    assert result["references"][all_low]["lowered_layers_mean"] == 3
