"""EAGL: entropy formula, variants, speed, data-free operation, matmul handling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bitmix.compiler.sensitivity import score
from bitmix.compiler.sensitivity.eagl import eagl_scores, entropy_bits


def test_entropy_of_known_distributions():
    assert entropy_bits(torch.tensor([3, 3, 3, 3])) == 0.0
    assert entropy_bits(torch.tensor([-2, -1, 0, 1])) == pytest.approx(2.0)
    assert entropy_bits(torch.tensor([0, 0, 1, 2])) == pytest.approx(1.5)


def test_eagl_is_data_free_and_zero_at_highest(mlp_ctx):
    ctx = dataclasses.replace(mlp_ctx, data=None)
    s = score("eagl", ctx)  # its wall time is measured by the frontier study's search_time.json
    assert set(s) == {"fc1", "fc2", "fc3"}
    for per_bits in s.values():
        assert per_bits[8] == 0.0 and per_bits[2] >= per_bits[4] > 0.0
        assert per_bits[4] <= 8.0  # entropy of 8-bit codes is at most 8 bits


def test_variants_follow_their_formulas(mlp_ctx):
    base = eagl_scores(mlp_ctx, "entropy")
    params = eagl_scores(mlp_ctx, "entropy_params")
    drop = eagl_scores(mlp_ctx, "entropy_drop")
    n = mlp_ctx.graph.layer("fc2").weight_elements
    assert params["fc2"][2] == pytest.approx(n * base["fc2"][2])
    assert drop["fc2"][8] == 0.0 and drop["fc2"][2] > drop["fc2"][4] > 0.0
    with pytest.raises(ValueError, match="unknown EAGL variant"):
        eagl_scores(mlp_ctx, "bogus")


def test_matmul_layers_use_activation_entropy_or_a_neutral_value(attention_ctx):
    with_data = score("eagl", attention_ctx)
    matmuls = [layer.name for layer in attention_ctx.graph.layers if layer.kind == "matmul"]
    assert len(matmuls) == 2
    assert all(math.isfinite(with_data[m][2]) and with_data[m][2] > 0 for m in matmuls)
    free = score("eagl", dataclasses.replace(attention_ctx, calibration=None))
    weighted = sorted(free[n][2] for n in free if n not in matmuls)
    assert free[matmuls[0]][2] == pytest.approx(weighted[len(weighted) // 2] if len(weighted) % 2 else
                                                 (weighted[0] + weighted[1]) / 2)
