"""Training at the highest choice: a trained copy, steps on their own learning rate, cached by content."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bitmix.compiler import pretrain
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.qlayer import quant_layers
from bitmix.compiler.quantize import fake_quantize, finetune
from bitmix.compiler.sensitivity import EAGLConfig, HAWQConfig
from bitmix.errors import BitmixError
from bitmix.ir.targets import get_target
from bitmix.task import FinetuneConfig
from tests.conftest import zoo_entry

RECIPE = FinetuneConfig(epochs=1, lr=0.01, optimizer="sgd", batch_size=64)


@pytest.fixture(scope="module")
def mlp():
    model, example, data = zoo_entry("digits-mlp")
    graph = capture(model, example, "digits-mlp")
    return prepare(graph), graph.names, data


def test_trains_a_copy_at_the_highest_choice(mlp):
    gm, names, data = mlp
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    target = get_target("int4int2-npu")
    trained = pretrain.train_at_highest(gm, names, target, data, RECIPE, step_lr=0.1)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert {n: q.bits for n, q in quant_layers(trained).items()} == pretrain.highest_assignment(names, target)
    with pytest.raises(BitmixError, match=">= 1 epoch"):
        pretrain.train_at_highest(gm, names, target, data, FinetuneConfig(epochs=0))


def test_steps_follow_their_own_learning_rate(mlp):
    gm, names, data = mlp
    fq = fake_quantize(gm, {n: 4 for n in names}, data.calibration(64))
    frozen = finetune(fq, data, 1, 0.01, step_lr=1e-30, max_batches=5)
    moved = finetune(fq, data, 1, 0.01, step_lr=1.0, max_batches=5)
    for name, layer in quant_layers(fq).items():
        assert torch.allclose(quant_layers(frozen)[name].w_quant.step, layer.w_quant.step, rtol=0, atol=1e-12)
        assert not torch.equal(quant_layers(frozen)[name].weight, layer.weight)  # weights still train
        assert not torch.allclose(quant_layers(moved)[name].w_quant.step, layer.w_quant.step)


def test_cached_in_memory_and_on_disk(mlp, tmp_path, monkeypatch):
    gm, names, data = mlp
    monkeypatch.setenv("BITMIX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pretrain, "_MEMORY", {})
    target = get_target("int4int2-npu")
    first = pretrain.cached_train_at_highest(gm, names, target, data, RECIPE, step_lr=0.1, seed=3)
    again = pretrain.cached_train_at_highest(gm, names, target, data, RECIPE, step_lr=0.1, seed=3)
    assert not first.cached and again.cached and again.model is first.model
    monkeypatch.setattr(pretrain, "_MEMORY", {})
    loaded = pretrain.cached_train_at_highest(gm, names, target, data, RECIPE, step_lr=0.1, seed=3)
    assert loaded.cached and len(list((tmp_path / "pretrain").glob("*.pt"))) == 1
    x = data.calibration(32)
    assert torch.equal(loaded.model(*x), first.model(*x))
    keys = {pretrain.cache_key(gm, target, RECIPE, 0.1, s) for s in (0, 3)}
    keys.add(pretrain.cache_key(gm, get_target("mixed-npu"), RECIPE, 0.1, 3))
    keys.add(pretrain.cache_key(gm, target, RECIPE, None, 3))
    keys.add(pretrain.cache_key(gm, target, RECIPE, 0.1, 3, data))
    fewer = dataclasses.replace(data, train=data.train.subset(torch.arange(len(data.train) - 1)))
    keys.add(pretrain.cache_key(gm, target, RECIPE, 0.1, 3, fewer))  # trained on other data: another entry
    assert len(keys) == 6


def test_memory_keeps_the_most_recently_used_and_the_disk_the_rest(mlp, tmp_path, monkeypatch):
    """A process that trains for many models (or seeds) keeps only the last MEMORY_ENTRIES in memory; an evicted
    one comes back from its disk copy, equal to the model first trained."""
    gm, names, data = mlp
    monkeypatch.setenv("BITMIX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pretrain, "_MEMORY", {})
    monkeypatch.setattr(pretrain, "MEMORY_ENTRIES", 2)
    target = get_target("int4int2-npu")

    def trained(seed: int) -> pretrain.Pretrained:
        return pretrain.cached_train_at_highest(gm, names, target, data, RECIPE, step_lr=0.1, seed=seed)

    first = {s: trained(s) for s in (0, 1)}
    assert trained(0).model is first[0].model
    trained(2)  # evicts seed 1 (least recently used), not 0
    assert len(pretrain._MEMORY) == 2
    assert trained(0).model is first[0].model
    back = trained(1)
    assert back.cached and back.model is not first[1].model
    x = data.calibration(32)
    assert torch.equal(back.model(*x), first[1].model(*x))


def test_pipeline_hook_only_for_methods_that_score_a_trained_model(mlp):
    gm, names, data = mlp
    target = get_target("int4int2-npu")
    assert pretrain.pretrain_stage(HAWQConfig().pretrain_step_lr_scale(), gm, names, target, data, 0) is None
    assert pretrain.pretrain_stage(EAGLConfig().pretrain_step_lr_scale(), gm, names, target, None, 0) is None
