"""The fine-tuning recipe: its checks and its learning rate per assignment."""

import re

import pytest

from bitmix.errors import BitmixError
from bitmix.ir.precision import Precision
from bitmix.task import FinetuneConfig


@pytest.mark.parametrize(("options", "message"), [
    ({"epochs": -1}, "FinetuneConfig.epochs must be an int >= 0, got -1"),
    ({"epochs": True}, "FinetuneConfig.epochs must be an int >= 0, got True"),
    ({"epochs": 1.5}, "FinetuneConfig.epochs must be an int >= 0, got 1.5"),
    ({"lr": float("nan")}, "FinetuneConfig.lr must be a finite number > 0, got nan"),
    ({"lr": 0}, "FinetuneConfig.lr must be a finite number > 0, got 0"),
    ({"optimizer": "rmsprop"}, "unknown FinetuneConfig.optimizer 'rmsprop'; valid: sgd, adam"),
    ({"batch_size": 0}, "FinetuneConfig.batch_size must be an int >= 1, got 0"),
    ({"layer_distill": -0.5}, "FinetuneConfig.layer_distill must be a finite number >= 0, got -0.5"),
    ({"step_lr_scale": float("inf")}, "FinetuneConfig.step_lr_scale must be a finite number > 0, got inf"),
    ({"lr_8bit_activations": float("nan")}, "FinetuneConfig.lr_8bit_activations must be a finite number > 0"),
])
def test_bad_recipe_values_are_refused_when_made(options, message):
    """A NaN lr used to surface after allocation as "x: contains NaN; cannot quantize", blaming the input."""
    with pytest.raises(BitmixError, match=f"^{re.escape(message)}"):
        FinetuneConfig(**options)


def test_zero_epochs_and_no_distillation_are_valid():
    assert FinetuneConfig(epochs=0, layer_distill=0.0).epochs == 0


def test_8_bit_activation_rate_applies_only_when_no_layer_reads_narrower():
    recipe = FinetuneConfig(lr=1e-4, lr_8bit_activations=3e-5)
    assert recipe.lr_for({"fc1": Precision(8, 8), "fc2": Precision(4, 8), "fc3": "2/8"}) == 3e-5
    assert recipe.lr_for({"fc1": Precision(8, 8), "fc2": Precision(4, 4)}) == 1e-4
    assert recipe.lr_for({"fc1": 8, "fc2": 2}) == 1e-4
    assert recipe.lr_for({}) == 1e-4


def test_without_an_8_bit_rate_every_assignment_gets_lr():
    assert FinetuneConfig(lr=0.01).lr_for({"fc1": Precision(4, 8)}) == 0.01
