"""The public compile() surface: signature size, Budget and Data values, task detail metrics, old spellings."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

import bitmix
from bitmix import Budget, CompileOptions, Data, EAGLConfig
from bitmix.task import Split, TaskData

QUICK = CompileOptions(frontier_points=0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4)).eval()


def _task(details=None) -> TaskData:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 16, generator=g), torch.randint(0, 4, (96,), generator=g)
    return TaskData("noise", "top1", Split((x[:64],), y[:64]), Split((x[64:],), y[64:]), details=details)


def test_signature_is_small():
    params = inspect.signature(bitmix.compile).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(params) <= 10 and len(positional) <= 3
    assert [p.name for p in positional] == ["model", "example_inputs", "target"]


def test_budget_values():
    assert Budget.of(0.8) == Budget(0.8) and Budget.of(Budget(fps=10.0)).fps == 10.0
    for bad, match in (({}, "budget is empty"), ({"fraction": 0.5, "fps": 3.0}, "not both"),
                       ({"fraction": 0}, "budget must be > 0"), ({"fps": -3}, "fps must be a positive number"),
                       ({"energy_j": float("nan")}, "must be a number")):
        with pytest.raises(bitmix.BitmixError, match=match):
            Budget(**bad)
    with pytest.raises(bitmix.BitmixError, match="budget must be a number"):
        Budget.of(True)


@pytest.mark.parametrize("model, seed, match", [
    (lambda t: 2 * t, 0, "model must be a torch.nn.Module, got function"),
    (None, "0", "seed must be an int, got '0'"),
    (None, 1.5, "seed must be an int, got 1.5"),
    (None, 2**70, "seed must be an int from -2\\*\\*63 to 2\\*\\*64 - 1"),  # was a raw OverflowError deep inside
    (None, -(2**63) - 1, "seed must be an int from -2\\*\\*63"),
])
def test_bad_model_or_seed_is_one_line(model, seed, match):
    net = nn.Linear(4, 2).eval() if model is None else model
    with pytest.raises(bitmix.BitmixError, match=match):
        bitmix.compile(net, (torch.randn(2, 4),), "int8-npu", seed=seed)


def test_an_already_compiled_model_is_refused_in_one_line(tmp_path):
    net = nn.Linear(4, 2).eval()
    x = torch.randn(2, 4)
    cm = bitmix.compile(net, (x,), "int8-npu", options=bitmix.CompileOptions(frontier_points=0))
    loaded = bitmix.load(cm.save(tmp_path / "m.pt2"))
    for model, kind in ((cm, "CompiledModel"), (loaded, "LoadedModel")):
        with pytest.raises(bitmix.BitmixError, match=f"already compiled by bitmix \\(a {kind}\\); compile the"):
            bitmix.compile(model, (x,), "int8-npu")


def test_data_roles():
    task, x = _task(), torch.randn(4, 16)
    assert Data.of(task) == Data(calibration=task, train=task, eval=task)
    assert Data.of(x).calibration is x and Data.of(x).train is None
    assert Data.of(None) == Data()


def test_clamped_budget_uses_the_cheapest_assignment():
    model, x = _mlp(), torch.randn(8, 16)
    with pytest.raises(bitmix.BitmixError, match="minimum achievable"):
        bitmix.compile(model, x, budget=0.01, options=QUICK)
    with pytest.warns(UserWarning, match="below the cheapest assignment"):
        cm = bitmix.compile(model, x, budget=Budget(0.01, clamp=True), options=QUICK)
    from bitmix.compiler.allocate import cheapest_fraction
    from bitmix.simulator import price

    cheapest = cheapest_fraction(price(cm.graph, cm.target))
    assert cm.report.budget == pytest.approx(cheapest) and cm.report.budget > 0.01
    assert cm.report.info["achieved_fraction"] == pytest.approx(cheapest)


def test_default_budget_fits_the_target():
    """No budget given: a one-choice target compiles at its only precision without a budget warning; where
    the cheapest assignment costs more than 0.75 (pinned first/last layers dominate), it is taken, with a
    warning; an explicit budget below it is still an error."""
    calib = torch.randn(32, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cm = bitmix.compile(_mlp(), calib[:4], "int8-npu", data=calib, options=QUICK)
    assert set(cm.assignment.values()) == {8} and cm.report.budget == 1.0
    torch.manual_seed(0)
    pinned_heavy = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 2), nn.ReLU(), nn.Linear(2, 512)).eval()
    with pytest.warns(UserWarning, match="below the cheapest assignment"):
        cm = bitmix.compile(pinned_heavy, calib[:4], "int4int2-npu", data=calib, options=QUICK)
    assert cm.report.budget > 0.75 and cm.report.info["achieved_fraction"] <= cm.report.budget
    with pytest.raises(bitmix.BitmixError, match="minimum achievable"):
        bitmix.compile(pinned_heavy, calib[:4], "int4int2-npu", budget=0.75, data=calib, options=QUICK)


def test_task_detail_metrics_are_reported_without_the_compiler_knowing_the_task():
    seen = []

    def details(model: nn.Module, data: TaskData) -> dict[str, float]:
        seen.append(type(model).__name__)
        return {"top1_again": data.evaluate(model)}

    task = _task(details)
    cm = bitmix.compile(_mlp(), task.calibration(8), budget=1.0, data=task, options=QUICK)
    acc = cm.report.accuracy
    assert acc["details"]["kernels"]["top1_again"] == acc["kernels"]
    assert acc["details"]["fake_quant"]["top1_again"] == acc["fake_quant"]
    assert "CompiledModel" in seen


def test_old_spellings_still_work_with_a_deprecation_warning():
    model, x, task = _mlp(), torch.randn(8, 16), _task()
    new = bitmix.compile(model, x, method=EAGLConfig(variant="entropy_drop"), budget=Budget(fps=1e7, clamp=True),
                         data=Data(calibration=task, train=task, eval=task),
                         options=CompileOptions(name="m", frontier_points=0))
    with pytest.warns(DeprecationWarning, match="calibration=, eval=, fps=.*deprecated"):
        old = bitmix.compile(model, x, method="eagl", budget=None, calibration=task, eval=task, fps=1e7,
                             clamp_budget=True, method_options={"eagl_variant": "entropy_drop"}, name="m",
                             frontier_points=0)
    assert old.assignment == new.assignment
    assert old.report.to_dict() | {"timings_s": {}} == new.report.to_dict() | {"timings_s": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(bitmix.BitmixError, match="unexpected keyword 'calibraton'"):
            bitmix.compile(model, x, calibraton=task)
        with pytest.raises(bitmix.BitmixError, match="unknown method option 'variant_x' for 'eagl'"):
            bitmix.compile(model, x, method_options={"variant_x": 1}, frontier_points=0)


def test_new_spelling_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        bitmix.compile(_mlp(), torch.randn(8, 16), budget=1.0, data=torch.randn(32, 16), options=QUICK)


def test_a_bad_executor_or_ray_address_is_one_line_before_any_stage():
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with pytest.raises(bitmix.BitmixError, match=r"executor must be 'local', 'ray' or an executor object .* got int"):
        bitmix.compile(model, torch.randn(2, 8), options=CompileOptions(executor=3))
    from bitmix.compiler.sensitivity.ray_executor import RayExecutor

    with pytest.raises(bitmix.BitmixError, match=r"Ray address must be a string .* got 12345"):
        RayExecutor(address=12345)


def test_inputs_below_the_smallest_step_are_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 4, bias=False)).eval()
    calib = torch.randn(32, 16) * 1e-10
    with pytest.warns(UserWarning, match=r"span less than the smallest activation step \(1e-08\).*scale the model"):
        bitmix.compile(model, calib[:4], "int8-npu", data=calib, options=CompileOptions(frontier_points=0))
    with warnings.catch_warnings(record=True) as seen:  # inputs of an ordinary scale: no such warning
        warnings.simplefilter("always")
        bitmix.compile(model, calib[:4] * 1e10, "int8-npu", data=calib * 1e10,
                       options=CompileOptions(frontier_points=0))
    assert not [w for w in seen if "smallest activation step" in str(w.message)]


def test_the_zoo_is_reachable_as_an_attribute_of_the_package():
    """`import bitmix; bitmix.zoo.names()` (an AttributeError until `import bitmix.zoo`), loaded only on use."""
    import subprocess
    import sys

    code = ("import sys, bitmix; loaded = 'bitmix.zoo' in sys.modules; names = bitmix.zoo.names(); "
            "print(loaded, 'resnet18' in names)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "True"]
