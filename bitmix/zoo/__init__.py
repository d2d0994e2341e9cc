"""Reference models and real data sets that work offline.

`load(name)` returns `(model, example_inputs, data_or_None)`; the model is in eval mode
and belongs to the caller. Nothing is downloaded: digits come from scikit-learn,
MiniLM from an installed wheel, and the large architectures are built here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bitmix.errors import BitmixError
from bitmix.task import TaskData

ZooEntry = tuple[nn.Module, tuple[torch.Tensor, ...], TaskData | None]


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    loader: Callable[[], ZooEntry]


def _digits(name: str) -> ZooEntry:
    from bitmix.zoo.digits import SERVING_BATCH, load_digits_model

    model, data = load_digits_model(name)
    return model, (data.test.inputs[0][:SERVING_BATCH],), data


def _minilm() -> ZooEntry:
    from bitmix.zoo.minilm import load_minilm

    return load_minilm()


def _image(builder: Callable[[], nn.Module]) -> ZooEntry:
    torch.manual_seed(0)
    return builder().eval(), (torch.randn(1, 3, 224, 224),), None


def _resnet18() -> ZooEntry:
    from bitmix.zoo.resnet import resnet18

    return _image(resnet18)


def _resnet50() -> ZooEntry:
    from bitmix.zoo.resnet import resnet50

    return _image(resnet50)


def _mobilenetv2() -> ZooEntry:
    from bitmix.zoo.mobilenet import MobileNetV2

    model, example, data = _image(MobileNetV2)
    _set_bn_statistics(model, torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    return model, example, data


@torch.no_grad()
def _set_bn_statistics(model: nn.Module, inputs: torch.Tensor) -> None:
    """BatchNorm running statistics from `inputs`, as training would leave them.

    At PyTorch's default init MobileNetV2's signal shrinks layer after layer; with the
    untrained statistics (mean 0, var 1) its features are ~1e-8 and the output is the
    classifier bias whatever the input, so no fidelity measurement means anything.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    model(inputs)
    model.eval()
    for m in norms:
        m.momentum = 0.1


def _bert_base() -> ZooEntry:
    from bitmix.zoo.bert import bert_base

    return bert_base()


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "digits-cnn", "ResNet-style CNN trained on sklearn digits (real 8x8 images)", lambda: _digits("digits-cnn")
        ),
        ZooModel("digits-mlp", "3-layer MLP trained on sklearn digits", lambda: _digits("digits-mlp")),
        ZooModel("minilm", "pretrained all-MiniLM-L6-v2 sentence encoder, stdlib docstrings", _minilm),
        ZooModel("resnet18", "ResNet-18 at 224x224, random init", _resnet18),
        ZooModel("resnet50", "ResNet-50 at 224x224, random init", _resnet50),
        ZooModel("mobilenetv2", "MobileNetV2 at 224x224, random init", _mobilenetv2),
        ZooModel("bert-base", "BERT-base encoder at sequence 128, random init", _bert_base),
    )
}


def names() -> tuple[str, ...]:
    return tuple(MODELS)


def load(name: str) -> ZooEntry:
    """Build (and for the digits models, train on first use) a zoo model."""
    if name not in MODELS:
        raise BitmixError(f"unknown model {name!r}; available: {', '.join(MODELS)} (see `bitmix models`)")
    return MODELS[name].loader()
