"""ALPS's per-process reuse: a lowered layer initialised from the base's cached layer inputs, and the
fake-quantized base shared by every seed, give the same floats as recomputing them."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from bitmix import zoo
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.qlayer import LSQQuantizer, quant_layers
from bitmix.compiler.rotate import rotate_linears
from bitmix.compiler.sensitivity import ALPSConfig, ScoreContext, SerialExecutor, score
from bitmix.compiler.sensitivity import alps as alps_module
from bitmix.ir.targets import get_target
from tests.compiler.sensitivity.conftest import TinyAttention

torch.set_num_threads(1)
QUICK = ALPSConfig(epochs=0.25, base_epochs=1, batch_size=32, calibration_size=16)


@pytest.fixture(scope="module")
def ctx() -> ScoreContext:
    """Linears and activation x activation matmuls, with labelled data (ALPS trains)."""
    torch.manual_seed(0)
    _, _, data = zoo.load("digits-mlp")
    data = dataclasses.replace(data, train=data.train.subset(torch.arange(200)))
    graph = capture(TinyAttention().eval(), (data.calibration(1)[0],), "tiny-attention")
    return ScoreContext(graph, get_target("mixed-npu"), prepare(graph), data, executor=SerialExecutor())


def _full_pass_lowered(base, name, bits, calibration):
    """The lowering as it was: the new steps set by a pass of the whole copy over the calibration inputs."""
    model = copy.deepcopy(base)
    layer = quant_layers(model)[name]
    signs = [q.signed if isinstance(q, LSQQuantizer) else None for q in (layer.a_quant, layer.b_quant)]
    if rotate_linears({name: layer}, {name: bits}):
        signs[0] = True
    layer.set_bits(bits, a_signed=signs[0], b_signed=signs[1])
    with torch.no_grad():
        model(*calibration)
    return model


def _state(model):
    layers = quant_layers(model).values()
    flags = [(q.signed, q.q_n, q.q_p) for m in layers for q in (m.a_quant, m.b_quant, m.w_quant) if q is not None]
    return model.state_dict(), flags


def test_lowered_layer_from_cached_inputs_matches_a_full_calibration_pass(ctx):
    work = alps_module.alps_jobs(ctx, QUICK)
    base, calibration = work.run.keywords["base"].module, work.run.keywords["calibration"]
    inputs = alps_module.layer_inputs(base, calibration)
    assert alps_module.layer_inputs(base, calibration) is inputs  # one pass per process
    kinds = set()
    for job in work.jobs[1:]:
        name, bits = job
        kinds.add(quant_layers(base)[name].kind)
        new, new_flags = _state(alps_module._lowered(base, name, bits, inputs.get(name)))
        old, old_flags = _state(_full_pass_lowered(base, name, bits, calibration))
        assert new_flags == old_flags
        assert new.keys() == old.keys()
        assert all(torch.equal(new[k], old[k]) for k in old), job
    assert kinds == {"linear", "matmul"}
    assert len(work.jobs) > 4


def test_every_seed_shares_one_fake_quantized_base_and_scores_as_if_recomputed(ctx):
    one = dataclasses.replace(ctx, seed=1)
    alps_module._BASES.clear()
    fresh = score(QUICK, one)
    score(QUICK, ctx)  # seed 0 leaves its base in the cache, which seed 1 then reuses
    assert score(QUICK, one) == fresh
    assignment = {n: ctx.target.choices[0] for n in ctx.free_layers} | ctx.target.pinned(ctx.graph.names)
    calibration = ctx.data.calibration(QUICK.calibration_size)
    base = alps_module._base
    assert base(ctx.model, assignment, calibration) is base(ctx.model, assignment, calibration)
    changed = copy.deepcopy(ctx.model)
    first = base(changed, assignment, calibration)
    with torch.no_grad():
        next(changed.parameters()).mul_(0.5)  # an in-place change misses the cache
    assert base(changed, assignment, calibration) is not first
    other = tuple(t.flip(0) for t in calibration)
    assert base(changed, assignment, other) is not base(changed, assignment, calibration)
