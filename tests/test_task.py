"""The fine-tuning recipe's learning rate per assignment."""

from bitmix.ir.precision import Precision
from bitmix.task import FinetuneConfig


def test_8_bit_activation_rate_applies_only_when_no_layer_reads_narrower():
    recipe = FinetuneConfig(lr=1e-4, lr_8bit_activations=3e-5)
    assert recipe.lr_for({"fc1": Precision(8, 8), "fc2": Precision(4, 8), "fc3": "2/8"}) == 3e-5
    assert recipe.lr_for({"fc1": Precision(8, 8), "fc2": Precision(4, 4)}) == 1e-4
    assert recipe.lr_for({"fc1": 8, "fc2": 2}) == 1e-4
    assert recipe.lr_for({}) == 1e-4


def test_without_an_8_bit_rate_every_assignment_gets_lr():
    assert FinetuneConfig(lr=0.01).lr_for({"fc1": Precision(4, 8)}) == 0.01
