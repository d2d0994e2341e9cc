"""Calibration data as users pass it: every accepted form gives the model's inputs, and cutting it is said."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bitmix
from bitmix.compiler.inputs import CALIBRATION_SAMPLES, calibration_inputs
from bitmix.errors import BitmixError
from bitmix.task import Split, TaskData

QUICK = bitmix.CompileOptions(frontier_points=0)


class _Text(nn.Module):
    """Token ids and an attention mask: two long inputs, which a loader of (ids, mask) must keep both of."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.l1, self.l2 = nn.Embedding(100, 32), nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).float()
        return self.l2((self.l1(self.emb(input_ids)).relu() * m).sum(1) / m.sum(1))


def _ids_mask(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, 16), generator=g)
    return ids, (torch.arange(16) < torch.randint(4, 17, (n, 1), generator=g)).long()


def test_a_loader_of_two_long_inputs_keeps_both():
    ids, mask = _ids_mask(32)
    calib, cut = calibration_inputs(DataLoader(TensorDataset(ids, mask), batch_size=8), (2, 2))
    assert cut is None and len(calib) == 2
    assert torch.equal(calib[0], ids) and torch.equal(calib[1], mask)
    calib, _ = calibration_inputs(DataLoader(TensorDataset(ids, mask, torch.zeros(32).long()), batch_size=8), (2, 2))
    assert len(calib) == 2 and torch.equal(calib[1], mask)  # (ids, mask, labels): the labels go


def test_a_two_input_model_compiles_on_a_loader_of_ids_and_mask():
    ids, mask = _ids_mask(32)
    model = _Text().eval()
    loader = DataLoader(TensorDataset(ids, mask), batch_size=8)
    cm = bitmix.compile(model, (ids[:2], mask[:2]), "int8-npu", data=loader, options=QUICK)
    assert not any("no calibration data" in w for w in cm.report.warnings)
    with torch.no_grad():
        out, ref = cm(ids, mask), model(ids, mask)
    assert float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean()) > 0.99


@pytest.mark.parametrize("y", [torch.arange(32) % 4, torch.randn(32)], ids=["long", "float"])
def test_a_one_input_models_loader_of_x_y_drops_y(y):
    x = torch.randn(32, 6)
    calib, cut = calibration_inputs(DataLoader(TensorDataset(x, y), batch_size=8), (2,))
    assert cut is None and len(calib) == 1 and torch.equal(calib[0], x)


def test_every_accepted_form_gives_the_inputs():
    x, y = torch.randn(32, 6), torch.arange(32) % 4
    task = TaskData("noise", "top1", Split((x,), y), Split((x[:4],), y[:4]))
    forms = {
        "tensor": x, "tuple": (x,), "task": task,
        "loader of x": DataLoader(TensorDataset(x), batch_size=8),
        "loader of (x, y)": DataLoader(TensorDataset(x, y), batch_size=8),
        "list of batches": [x[i:i + 8] for i in range(0, 32, 8)],
        "list of (x, y) pairs": [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)],
        "list of single examples": list(x),
        "list of single (x, y) examples": list(zip(x, y, strict=True)),
    }
    for name, source in forms.items():
        calib, cut = calibration_inputs(source, (2,))
        assert cut is None and len(calib) == 1 and torch.equal(calib[0], x), name
    assert calibration_inputs(None, (2,)) == (None, None)
    with pytest.raises(BitmixError, match="tuples of tensors"):
        calibration_inputs([("a", "b", "c")], (2,))


def test_more_than_the_calibration_samples_is_said_once():
    n = CALIBRATION_SAMPLES
    x = torch.randn(2 * n + 8, 6)
    said = {
        "tensor": calibration_inputs(x, (2,))[1],
        "tuple": calibration_inputs((x, x), (2, 2))[1],
        "loader ending mid-batch": calibration_inputs(DataLoader(TensorDataset(x[:n + 1]), batch_size=n // 2), (2,))[1],
        "loader with batches left": calibration_inputs(DataLoader(TensorDataset(x), batch_size=n // 2), (2,))[1],
    }
    assert said["tensor"] == said["tuple"] == (f"calibration data holds {2 * n + 8} examples; bitmix calibrates on "
                                               f"the first {n} and ignores the rest")
    for name in ("loader ending mid-batch", "loader with batches left"):
        assert said[name] == f"calibration data holds more than {n} examples; bitmix calibrates on the first {n} " \
                             "and ignores the rest", name
    exactly = (x[:n], DataLoader(TensorDataset(x[:n]), batch_size=n // 2), list(x[:n]))
    assert all(calibration_inputs(source, (2,))[1] is None for source in exactly)
    task = TaskData("noise", "top1", Split((x,), torch.zeros(len(x)).long()), Split((x[:4],), torch.zeros(4).long()))
    assert calibration_inputs(task, (2,))[1] is None  # a training set calibrates on its first examples by design

    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = bitmix.compile(model, (x[:2],), "int8-npu", data=x, options=QUICK)
    cut = [str(w.message) for w in caught if "calibrates on the first" in str(w.message)]
    assert cut == [said["tensor"]] and said["tensor"] in cm.report.warnings
