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


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _labelled(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_a_loader_of_x_y_in_the_train_or_eval_role_is_a_classification_task():
    """Data(train=<DataLoader of (x, y)>) was refused ("must be a TaskData"), and TaskData needed bitmix.task.Split,
    which bitmix did not export: no route from a PyTorch loader to alps / hawq / finetune."""
    from bitmix.compiler.inputs import resolve_data

    x, y = _labelled()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    roles = resolve_data(bitmix.Data(train=loader, eval=loader))
    for task in (roles.train, roles.eval):
        assert isinstance(task, TaskData) and task.metric == "top1"
        assert torch.equal(task.train.inputs[0], x) and torch.equal(task.train.targets, y)
        assert torch.equal(task.test.targets, y)
    assert bitmix.Split is Split and bitmix.TaskData is TaskData  # what the messages name, reachable from bitmix
    bitmix.TaskData("mine", "top1", bitmix.Split((x,), y), bitmix.Split((x[:4],), y[:4]))  # the docstring's form


def test_a_method_that_trains_and_finetuning_run_on_a_loader_of_x_y():
    x, y = _labelled()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    cm = bitmix.compile(_Classifier().eval(), x[:2], "int8-npu", method="hawq", data=bitmix.Data(train=loader),
                        finetune=1, options=QUICK)
    with torch.no_grad():
        assert torch.equal(cm(x), cm.fake_quant.eval()(x))


@pytest.mark.parametrize("batches,match", [
    (torch.randn(8, 3), r"Data\(train=...\) must be a TaskData or a DataLoader of \(inputs..., class labels\) "
                        r"batches, e.g. Data\(train=DataLoader\(TensorDataset\(x, y\), batch_size=64\)\); got Tensor"),
    ([(torch.randn(4, 3), torch.randn(4))], r"labels must be integer class indices of shape \(batch,\), got "
                                            r"torch.float32 of shape \(4,\) \(other targets: build a TaskData\)"),
    ([{"x": torch.randn(4, 3), "labels": torch.zeros(4).long()}],
     r"got a batch of \{'x', 'labels'\}: yield \(inputs..., labels\) tuples instead"),
    ([torch.randn(4, 3)], "got a batch of Tensor without labels"),
])
def test_a_train_role_that_is_not_labelled_batches_is_one_line(batches, match):
    with pytest.raises(BitmixError, match=match):
        bitmix.compile(nn.Linear(3, 2), torch.randn(2, 3), "int8-npu", data=bitmix.Data(train=batches), options=QUICK)


def test_methods_that_need_labels_say_how_to_give_them():
    x, y = _labelled()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    for kwargs in ({"method": "alps"}, {"finetune": 1}):
        with pytest.raises(BitmixError, match=r"needs labelled training data: pass "
                                              r"data=bitmix.Data\(train=loader\) \(a DataLoader of \(inputs..., class "
                                              r"labels\)\) or a bitmix.TaskData"):
            bitmix.compile(_Classifier().eval(), x[:2], "int8-npu", data=loader, options=QUICK, **kwargs)


def test_a_loader_of_dicts_calibrates_by_the_forwards_argument_names():
    """A DataLoader of dict batches was refused ("must be tensors or tuples of tensors") though cm() takes inputs
    by name: its values at the forward's argument names are the inputs; other keys (labels) go."""
    ids, mask = _ids_mask(32)
    rows = [{"attention_mask": m, "input_ids": i, "labels": 0} for i, m in zip(ids, mask, strict=True)]
    calib, _ = calibration_inputs(DataLoader(rows, batch_size=8), (2, 2), ("input_ids", "attention_mask"))
    assert torch.equal(calib[0], ids) and torch.equal(calib[1], mask)
    with pytest.raises(BitmixError, match=r"has no 'attention_mask', an input of the model \(input_ids, "
                                          r"attention_mask\); key the batches by the forward's argument names"):
        calibration_inputs([{"input_ids": ids}], (2, 2), ("input_ids", "attention_mask"))
    model = _Text().eval()
    cm = bitmix.compile(model, (ids[:2], mask[:2]), "int8-npu", data=DataLoader(rows, batch_size=8), options=QUICK)
    assert not any("no calibration data" in w for w in cm.report.warnings)


@pytest.mark.parametrize("name", ["gated", "keyword"])
def test_dict_calibration_batches_bind_like_a_dict_example(name):
    """Dict batches are read at the names the example inputs were bound to (keyword-only ones too, and skipping an
    argument the example left out): the same calibration, bit for bit, as tuples in the forward's order."""
    from tests.compiler.test_capture import Gated, KeywordOnly

    torch.manual_seed(0)
    x, t = torch.randn(32, 16), torch.randn(32, 8)
    if name == "gated":
        model, example, ordered = Gated().eval(), {"t": t[:2], "x": x[:2]}, (x, t)
        rows = [{"labels": 0, "t": b, "x": a} for a, b in zip(x, t, strict=True)]
    else:
        model, example, ordered = KeywordOnly().eval(), {"x": x[:2], "y": t[:2]}, (t, x)
        rows = [{"x": a, "y": b, "labels": 0} for a, b in zip(x, t, strict=True)]
    by_dict = bitmix.compile(model, example, "int8-npu", data=DataLoader(rows, batch_size=8), options=QUICK)
    by_tuple = bitmix.compile(model, example, "int8-npu", data=ordered, options=QUICK)
    probe = (x[:5], t[:5]) if name == "gated" else (t[:5], x[:5])
    assert torch.equal(by_dict(*probe), by_tuple(*probe))
