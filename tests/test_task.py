"""Task data: the fine-tuning recipe (its checks and its learning rate per assignment), loaders read into memory."""

import re
import warnings
from collections.abc import Iterator

import pytest
import torch

from bitmix import task
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



def test_a_loader_larger_than_the_cap_is_read_only_up_to_it(monkeypatch):
    """`TaskData.classification` read a whole DataLoader into memory (10^6 CIFAR-sized images: 12 GB, twice that
    while joined): it keeps the first whole batches up to MAX_LOADER_BYTES, says so, and reads no further."""
    # a batch: 10 x (3x4x4 float32 + an int64 label), 2000 bytes
    monkeypatch.setattr(task, "MAX_LOADER_BYTES", 6000, raising=False)

    def batches(count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(count):
            if i == 4:
                raise AssertionError("read past the cap")
            yield torch.randn(10, 3, 4, 4), torch.randint(0, 3, (10,))

    with pytest.warns(UserWarning, match=r"^Data\(eval=...\) holds more than .* GiB of tensors; bitmix reads its "
                                         r"first 30 examples \(.* GiB\) into memory and measures accuracy on those "
                                         r"only; pass a loader over the subset you want, or a TaskData$"):
        capped = task.TaskData.classification(batches(100), "eval")
    assert len(capped.test) == 30 and capped.test.inputs[0].shape == (30, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loader that fits is read whole, without a word
        assert len(task.TaskData.classification(batches(3), "train").train) == 30
