"""EAGL: entropy formula, variants, speed, data-free operation, matmul handling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bitmix.compiler.pretrain import train_at_highest
from bitmix.compiler.qlayer import LSQQuantizer, quant_layers
from bitmix.compiler.sensitivity import score
from bitmix.compiler.sensitivity.eagl import (
    VARIANTS,
    EAGLConfig,
    _codes,
    entropies,
    entropy_bits,
    variant_scores,
)
from bitmix.errors import BitmixError
from bitmix.ir.targets import Target
from bitmix.task import FinetuneConfig


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
    ctx = dataclasses.replace(mlp_ctx, data=None, target=Target("b/b", (8, 4, 2)))  # type: ignore[arg-type]
    h = entropies(ctx, EAGLConfig(steps="mse"))
    s = {v: variant_scores(ctx, h, v) for v in VARIANTS}
    n = ctx.graph.layer("fc2").weight_elements
    h2 = h["fc2"]
    assert s["entropy"]["fc2"] == pytest.approx({8: 0.0, 4: h2[8], 2: h2[8] + h2[4]})
    assert s["neg_entropy"]["fc2"] == pytest.approx({8: 0.0, 4: 8 - h2[8], 2: 8 - h2[8] + 4 - h2[4]})
    assert s["entropy_drop"]["fc2"] == pytest.approx({8: 0.0, 4: h2[8] - h2[4], 2: h2[8] - h2[2]})
    assert s["neg_entropy_drop"]["fc2"][2] == pytest.approx(6 - (h2[8] - h2[2]))
    assert s["entropy_drop_params"]["fc2"][2] == pytest.approx(n * s["entropy_drop"]["fc2"][2])
    with pytest.raises(BitmixError, match="unknown EAGL variant"):
        variant_scores(mlp_ctx, {}, "bogus")
    with pytest.raises(BitmixError, match="unknown EAGL steps"):
        EAGLConfig(steps="bogus")
    for scale in (0.0, float("nan"), float("inf"), "10"):
        with pytest.raises(BitmixError, match="EAGLConfig.step_lr_scale must be a finite number > 0"):
            EAGLConfig(step_lr_scale=scale)


def test_mse_rule_codes_are_the_ptq_ranges_codes():
    """The data-free rule scores the codes PTQ would deploy: the range setting's per-channel MSE steps."""
    torch.manual_seed(0)
    w = torch.randn(4, 200) * torch.tensor([[0.1], [1.0], [3.0], [0.01]])
    ptq = LSQQuantizer(2, True, 4)
    ptq.init_range(w)
    init = LSQQuantizer(2, True, 4)
    init.init_step(w)
    assert torch.equal(_codes(w, 2, True, True, "mse", None), ptq.codes(w))
    assert torch.equal(_codes(w, 2, True, True, "init", None), init.codes(w))
    assert not torch.equal(ptq.codes(w), init.codes(w))


def test_learned_steps_come_from_the_model_trained_at_the_highest_choice(mlp_ctx):
    recipe = FinetuneConfig(epochs=1, lr=0.01, optimizer="sgd", batch_size=64)
    trained = train_at_highest(mlp_ctx.model, mlp_ctx.graph.names, mlp_ctx.target, mlp_ctx.data, recipe,
                               step_lr=0.1, seed=0)
    layer = quant_layers(trained)["fc2"]
    assert layer.bits == 8
    init = LSQQuantizer(8, True, layer.weight.shape[0])
    init.init_step(quant_layers(mlp_ctx.model)["fc2"].weight)
    assert not torch.allclose(layer.w_quant.step, init.step)  # the steps did train
    h = entropies(dataclasses.replace(mlp_ctx, pretrained=trained), EAGLConfig(steps="learned"))
    assert h["fc2"][8] == pytest.approx(entropy_bits(layer.w_quant.codes(layer.weight)))
    fallback = entropies(dataclasses.replace(mlp_ctx, data=None), EAGLConfig())  # no data: MSE on FP32 weights
    assert fallback == entropies(dataclasses.replace(mlp_ctx, data=None), EAGLConfig(steps="mse"))


def test_matmul_layers_use_activation_entropy_or_a_neutral_value(attention_ctx):
    with_data = score("eagl", attention_ctx)
    matmuls = [layer.name for layer in attention_ctx.graph.layers if layer.kind == "matmul"]
    assert len(matmuls) == 2
    assert all(math.isfinite(with_data[m][2]) and with_data[m][2] > 0 for m in matmuls)
    free = score("eagl", dataclasses.replace(attention_ctx, calibration=None))
    weighted = sorted(free[n][2] for n in free if n not in matmuls)
    assert free[matmuls[0]][2] == pytest.approx(weighted[len(weighted) // 2] if len(weighted) % 2 else
                                                 (weighted[0] + weighted[1]) / 2)
