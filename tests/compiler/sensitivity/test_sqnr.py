"""SQNR with the deployed quantizer (`SQNRConfig(quantizer="deployed")`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bitmix import SQNRConfig, zoo
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.quantize import fake_quantize
from bitmix.compiler.sensitivity import ScoreContext, score, seeded
from bitmix.compiler.sensitivity.sqnr import _flat
from bitmix.errors import BitmixError
from bitmix.ir.targets import get_target

DEPLOYED = SQNRConfig(quantizer="deployed")


class _ThreeLinears(nn.Module):
    """First and last layers pinned: one free layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x.reshape(x.shape[0], -1))))))


def test_one_free_layer_scores_its_deployed_output_error() -> None:
    """With one free layer the deployed score is exactly the output error of `fake_quantize` with that layer
    alone at each choice (no smoothing or equalisation), relative to the highest choice's."""
    torch.manual_seed(0)
    _, _, data = zoo.load("digits-mlp")
    calib = data.calibration(32)
    graph = capture(_ThreeLinears().eval(), (calib[0][:1],), "three-linears")
    ctx = ScoreContext(graph, get_target("int4int2-npu"), prepare(graph), None, calibration=calib)
    (free,) = ctx.free_layers
    with torch.no_grad():
        ref = _flat(ctx.model(*calib))
        err = {b: float((_flat(fake_quantize(ctx.model, {free: b}, calib, smoothing=False, equalization=False)(*calib))
                         - ref).pow(2).sum()) / float(ref.pow(2).sum()) for b in ctx.target.choices}
    s = score(DEPLOYED, ctx)
    for b in ctx.target.choices:
        assert s[free][b] == pytest.approx(err[b] - err[ctx.target.highest], rel=1e-6)
    assert s[free][ctx.target.lowest] > 0


def test_deployed_scores_on_a_conv_net_leave_the_model_unchanged() -> None:
    """digits-cnn (conv pairs that `fake_quantize` would equalise): every free layer scored, the narrower
    choice loses more than the highest, the same again on a second run, the float model untouched."""
    model, example, data = zoo.load("digits-cnn")
    graph = capture(model, example, "digits-cnn")
    ctx = ScoreContext(graph, get_target("int4int2-npu"), prepare(graph), None, calibration=data.calibration(32))
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    s = score(DEPLOYED, ctx)
    assert set(s) == set(ctx.free_layers)
    assert all(v[ctx.target.highest] == 0.0 and v[ctx.target.lowest] > 0 for v in s.values())
    assert score(DEPLOYED, ctx) == s
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in before.items())
    assert s != score("sqnr", ctx)  # the LSQ-initialised steps give other scores


def test_sqnr_is_registered_seed_free_and_every_seed_scores_the_same() -> None:
    """A study scores a seed-free method once for every seed (`sensitivity.seeded`): both quantizers must give
    the same floats whatever the seed; the methods that draw probes or train stay seeded."""
    model, example, data = zoo.load("digits-cnn")
    graph = capture(model, example, "digits-cnn")
    ctx = ScoreContext(graph, get_target("int4int2-npu"), prepare(graph), None, calibration=data.calibration(32))
    other = dataclasses.replace(ctx, seed=7)
    for method in ("sqnr", DEPLOYED):
        assert not seeded(method)
        assert score(method, ctx) == score(method, other)
    assert all(seeded(m) for m in ("alps", "hawq", "limpq", "eagl", "random"))


def test_unknown_quantizer_is_an_error() -> None:
    with pytest.raises(BitmixError, match="unknown SQNR quantizer 'gptq'; valid: lsq-init, deployed"):
        SQNRConfig(quantizer="gptq")
