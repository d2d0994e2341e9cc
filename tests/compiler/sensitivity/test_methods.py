"""SQNR, HAWQ, LIMPQ and ALPS on digits-mlp: shape of the scores, formulas, determinism."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from bitmix.compiler.allocate import Budget, allocate
from bitmix.compiler.sensitivity import ALPSConfig, HAWQConfig, LIMPQConfig, ProcessExecutor, SerialExecutor, score
from bitmix.compiler.sensitivity.hawq import hutchinson_traces
from bitmix.errors import BitmixError
from bitmix.ir.cost import CostModel
from bitmix.ir.precision import Precision


def _check_shape(scores, ctx):
    assert set(scores) == set(ctx.free_layers)
    for per_bits in scores.values():
        assert set(per_bits) == set(ctx.target.choices)
        assert per_bits[ctx.target.highest] == 0.0


def test_sqnr_scores_grow_as_bits_drop(mlp_ctx):
    s = score("sqnr", mlp_ctx)
    _check_shape(s, mlp_ctx)
    assert all(v[2] > v[4] > 0 for v in s.values())


def test_sqnr_scores_activation_widths(mlp_ctx):
    """On (w, a) pairs: narrower activations at the same weight width lose more."""
    s = score("sqnr", mlp_ctx)
    for w, a_hi, a_lo in ((4, 8, 4), (2, 8, 4), (2, 4, 2)):
        assert sum(v[Precision(w, a_lo)] for v in s.values()) > sum(v[Precision(w, a_hi)] for v in s.values())


def test_weight_methods_score_the_weight_width(mlp_ctx):
    """EAGL and HAWQ see weights only: pairs with the same weight width tie."""
    for method in ("eagl", HAWQConfig(samples=2, examples=32)):
        s = score(method, mlp_ctx)
        _check_shape(s, mlp_ctx)
        assert all(v[Precision(4, 8)] == v[Precision(4, 4)] and v[Precision(2, 8)] == v[Precision(2, 2)]
                   for v in s.values())


def test_sqnr_handles_matmul_layers(attention_ctx):
    s = score("sqnr", attention_ctx)
    _check_shape(s, attention_ctx)
    assert all(v[2] > 0 for v in s.values())


def test_hutchinson_on_a_quadratic():
    torch.manual_seed(0)
    a = torch.randn(6, 6)
    hessian = a @ a.T
    x = torch.randn(6, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    diag = torch.tensor([1.0, 2.0, 3.0])
    gen = torch.Generator().manual_seed(1)
    traces = hutchinson_traces(lambda: 0.5 * x @ hessian @ x + 0.5 * (diag * y * y).sum(), [x, y], 400, gen)
    assert traces[1] == pytest.approx(6.0)  # diagonal: exact for every Rademacher probe
    assert traces[0] == pytest.approx(float(torch.trace(hessian)), rel=0.15)


def test_hawq_and_limpq_scores(mlp_ctx):
    h = score(HAWQConfig(samples=4, examples=64), mlp_ctx)
    _check_shape(h, mlp_ctx)
    assert all(v[2] >= v[4] >= 0 for v in h.values())
    lq = score(LIMPQConfig(epochs=1), mlp_ctx)
    _check_shape(lq, mlp_ctx)
    assert all(v[2] >= v[4] >= 0 for v in lq.values())


@pytest.mark.parametrize(("config", "options", "message"), [
    (ALPSConfig, {"epochs": float("nan")}, "ALPSConfig.epochs must be a finite number > 0, got nan"),
    (ALPSConfig, {"epochs": float("inf")}, "ALPSConfig.epochs must be a finite number > 0"),
    (ALPSConfig, {"base_epochs": -1}, "ALPSConfig.base_epochs must be an int >= 0, got -1"),
    (ALPSConfig, {"lr": float("nan")}, "ALPSConfig.lr must be a finite number > 0, got nan"),
    (ALPSConfig, {"metric": "accuracy"}, "unknown ALPS metric 'accuracy'"),
    (ALPSConfig, {"batch_size": 0}, "ALPSConfig.batch_size must be an int >= 1, got 0"),
    (ALPSConfig, {"calibration_size": True}, "ALPSConfig.calibration_size must be an int >= 1, got True"),
    (HAWQConfig, {"samples": 0}, "HAWQConfig.samples must be an int >= 1, got 0"),
    (HAWQConfig, {"samples": -1}, "HAWQConfig.samples must be an int >= 1, got -1"),
    (HAWQConfig, {"examples": 0}, "HAWQConfig.examples must be an int >= 1, got 0"),
    (HAWQConfig, {"examples": 2.0}, "HAWQConfig.examples must be an int >= 1, got 2.0"),
    (LIMPQConfig, {"epochs": 0}, "LIMPQConfig.epochs must be an int >= 1, got 0"),
    (LIMPQConfig, {"lr": float("nan")}, "LIMPQConfig.lr must be a finite number > 0, got nan"),
    (LIMPQConfig, {"batch_size": 0}, "LIMPQConfig.batch_size must be an int >= 1, got 0"),
    (LIMPQConfig, {"calibration_size": -3}, "LIMPQConfig.calibration_size must be an int >= 1, got -3"),
])
def test_configs_refuse_bad_values_when_made(config, options, message):
    """Checked when the config is made, in one line: not a ZeroDivisionError, torch's "Invalid learning rate" or
    a silent zero-probe trace once the method runs."""
    with pytest.raises(BitmixError, match=f"^{re.escape(message)}"):
        config(**options)


def test_alps_is_deterministic_and_executor_independent(mlp_ctx):
    quick = ALPSConfig(epochs=0.25, base_epochs=1)
    serial = score(quick, dataclasses.replace(mlp_ctx, executor=SerialExecutor()))
    _check_shape(serial, mlp_ctx)
    pooled = score(quick, dataclasses.replace(mlp_ctx, executor=ProcessExecutor(2)))
    assert pooled == serial
    names = mlp_ctx.graph.names
    pinned = mlp_ctx.target.pinned(names)
    choices = [(pinned[n],) if n in pinned else mlp_ctx.target.choices for n in names]
    costs = CostModel.of_terms(names, choices, {"cycles": [[float((b.w + b.a) * (i + 1)) for b in c] for i, c in
                                                           enumerate(choices)]})
    a1 = allocate(serial, costs, mlp_ctx.target, mlp_ctx.graph.names, Budget(fraction=0.6))
    a2 = allocate(pooled, costs, mlp_ctx.target, mlp_ctx.graph.names, Budget(fraction=0.6))
    assert a1 == a2


def test_same_seed_same_scores(mlp_ctx):
    for method in ("eagl", "sqnr", HAWQConfig(samples=4, examples=64)):
        assert score(method, mlp_ctx) == score(method, mlp_ctx)
