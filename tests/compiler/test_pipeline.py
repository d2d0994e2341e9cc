import json

import pytest
import torch
from torch import nn

import bitmix
from bitmix import Budget, CompileOptions, Data
from bitmix.errors import BitmixError
from bitmix.simulator import simulate
from tests.compiler.modules import CallCounter

QUICK = CompileOptions(frontier_points=0)


@pytest.fixture(scope="module")
def digits():
    from bitmix import zoo

    return zoo.load("digits-cnn")


@pytest.fixture(scope="module")
def compiled(digits):
    model, inputs, data = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = bitmix.compile(model, inputs, "int4int2-npu", method="eagl", budget=0.75, data=data, finetune=2,
                        options=CompileOptions(name="digits-cnn", frontier_points=4))
    return cm, before


def test_compile_report_contract(compiled, tmp_path):
    cm, _ = compiled
    report = cm.report
    html = bitmix.save_report(report, tmp_path)
    d = json.loads((tmp_path / "report.json").read_text())
    for key in ("model", "target", "method", "budget", "layers", "simulated", "accuracy", "timings_s"):
        assert key in d
    for key in ("name", "kind", "bits", "macs", "params", "cycles", "energy_j", "score"):
        assert key in d["layers"][0]
    for key in ("cycles", "latency_s", "throughput_fps", "energy_per_frame_j", "power_w", "fps_per_w",
                "utilization", "chips"):
        assert d["simulated"][key] > 0
    for key in ("metric", "fp32", "fake_quant", "kernels"):
        assert key in d["accuracy"]
    assert {"capture", "price", "score", "allocate", "quantize", "finetune", "lower", "simulate"} <= set(d["timings_s"])
    assert html.exists() and (tmp_path / "frontier.png").exists() and (tmp_path / "bits.png").exists()
    assert bitmix.load_report(tmp_path).to_dict() == json.loads(json.dumps(report.to_dict()))


def test_compile_respects_target_and_budget(compiled):
    cm, _ = compiled
    rows = cm.report.layers
    assert rows[0].bits == 8 and rows[-1].bits == 8 and rows[0].pinned and rows[-1].pinned
    assert {r.bits for r in rows[1:-1]} <= {4, 2}
    assert 2 in {r.bits for r in rows}
    assert cm.report.info["achieved_fraction"] <= 0.75 + 1e-9


def test_kernel_accuracy_equals_fake_quant(compiled):
    cm, _ = compiled
    acc = cm.report.accuracy
    assert acc["metric"] == "top1" and acc["fp32"] >= 97
    assert acc["kernels"] == acc["fake_quant"]
    assert acc["kernels"] >= 90


def test_user_model_untouched(compiled, digits):
    cm, before = compiled
    model = digits[0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, type(cm)) for m in model.modules())


def test_compiled_model_runs_and_prices_what_ran(compiled, digits):
    cm, _ = compiled
    x = digits[2].test.inputs[0][:4]
    cm.reset_calls()
    out = cm(x)
    assert out.shape == (4, 10)
    sim = cm.simulate()
    assert sim.frames == 4
    assert sum(layer.macs for layer in sim.layers) == 4 * cm.graph.total_macs // 256
    for _ in range(3):  # a serving loop: the record is the last pass, not a growing list of all of them
        cm(x)
    assert cm.simulate().cycles == sim.cycles and len(cm.recorder.calls) == len(cm.graph.layers)
    cm(x[:2])
    assert cm.simulate().frames == 2
    cm.reset_calls()
    with pytest.raises(BitmixError, match="no kernel calls"):
        cm.simulate()


@pytest.fixture(scope="module")
def int8(digits):
    model, inputs, _ = digits
    return bitmix.compile(model, inputs, "int8-npu", data=inputs[0][:32], options=QUICK)


def test_pricing_the_traced_input_reproduces_the_report(int8, digits):
    """The accelerator runs the graph's schedule whatever order the CPU ran the kernels in (digits-cnn's
    lowering runs block2's shortcut conv before its second conv): the report's cost, not 5 % off it."""
    cm, inputs = int8, digits[1]
    cm(*inputs)
    assert [c[0] for c in cm.recorder.calls] != list(cm.graph.names)
    sim, report = cm.simulate(), cm.report.simulated
    assert sim.latency_s == pytest.approx(report["latency_s"], rel=1e-12)
    assert sim.energy_per_frame_j == pytest.approx(report["energy_per_frame_j"], rel=1e-12)


class _Encoder(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.emb, self.qkv, self.out = nn.Embedding(50, d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = self.norm(x + self.out(torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v))
        return x + self.down(nn.functional.gelu(self.up(x)))


def test_priced_vector_work_grows_with_each_ops_own_shape():
    """Run at 4x the traced sequence: a softmax grows 16x, a LayerNorm 4x (not both by the MAC ratio)."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    cm = bitmix.compile(model, torch.randint(0, 50, (2, 16)), "int8-npu", data=torch.randint(0, 50, (8, 16)),
                        options=QUICK)
    longer = torch.randint(0, 50, (2, 64))
    cm(longer)
    sim = cm.simulate()
    at_64 = simulate(bitmix.capture(model, longer), cm.assignment)
    assert sim.latency_s == pytest.approx(at_64.latency_s, rel=1e-12)
    assert sim.energy_per_frame_j == pytest.approx(at_64.energy_per_frame_j, rel=1e-2)


def test_concurrent_forwards_each_price_their_own_pass(int8, digits):
    """A serving pool calls one compiled model from several threads: each thread's record is its own pass."""
    import threading

    cm, x = int8, digits[1][0]
    barrier, seen, errors = threading.Barrier(4), {}, []

    def serve(batch: int) -> None:
        try:
            barrier.wait()
            for _ in range(5):
                out = cm(x[:batch])
                assert out.shape[0] == batch and len(cm.recorder.calls) == len(cm.graph.layers)
                seen[batch] = cm.simulate().frames
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(b,)) for b in (1, 3, 5, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and seen == {1: 1, 3: 3, 5: 5, 7: 7}


def test_forwards_run_while_another_thread_exports(int8, digits, monkeypatch):
    """`torch.export` sets a process-global "compiling" flag: a compiled model served from another thread
    meanwhile (another model being exported, `cm.save`) must still run its kernels on real tensors."""
    from bitmix.compiler.lower import KernelLayer

    cm, x = int8, digits[1][0][:4]
    layers = [m for m in cm.lowered.modules() if isinstance(m, KernelLayer)]
    producer = next(m for m in layers if m.codes_for is not None)
    consumer = next(m for m in layers if m.plan is producer.codes_for)
    want = cm(x)
    cm(x)  # the second call hands conv codes to the next conv

    def export_starts(module: nn.Module, args: tuple) -> None:  # between two layers of one forward
        monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)

    hook = consumer.register_forward_pre_hook(export_starts)
    try:
        assert torch.equal(cm(x), want)
    finally:
        hook.remove()
    assert torch.equal(cm(x), want)


def test_a_static_export_is_scored_on_every_test_batch(digits):
    """A model compiled for its example batch alone is evaluated in batches of that size, the last padded:
    the task's last, shorter batch stopped the compile at its very end."""
    model, inputs, data = digits
    assert len(data.test) % inputs[0].shape[0]
    cm = bitmix.compile(model, inputs, "int8-npu", data=data,
                        options=CompileOptions(frontier_points=0, dynamic_shapes=None))
    assert cm.input_spec.dims[0][0] == inputs[0].shape[0]
    assert cm.report.accuracy["kernels"] == cm.report.accuracy["fake_quant"] > 90


def test_same_seed_same_assignment(digits):
    model, inputs, data = digits
    a = bitmix.compile(model, inputs, method="eagl", budget=0.8, data=Data(calibration=data), options=QUICK)
    b = bitmix.compile(model, inputs, method="eagl", budget=0.8, data=Data(calibration=data), options=QUICK)
    assert a.assignment == b.assignment
    x = data.test.inputs[0][:8]
    assert torch.equal(a(x), b(x))


def test_pareto_greedy_strategy_and_pretrain_stage(digits):
    model, inputs, data = digits
    greedy = bitmix.compile(model, inputs, method="eagl", budget=0.8, data=data,
                            options=bitmix.CompileOptions(frontier_points=0, strategy="pareto-greedy"))
    assert greedy.report.info["solver"] == "pareto-greedy" and greedy.report.info["achieved_fraction"] <= 0.8
    assert "pretrain" in greedy.report.timings_s  # EAGL with data scores the model trained at 4 bits
    with pytest.raises(BitmixError, match="unknown allocation strategy"):
        bitmix.compile(model, inputs, method="sqnr", budget=0.8, data=data,
                       options=bitmix.CompileOptions(frontier_points=0, strategy="bogus"))


def test_absolute_fps_goal(digits):
    model, inputs, data = digits
    cm = bitmix.compile(model, inputs, method="eagl", budget=Budget(fps=5e7), data=Data(calibration=data),
                        options=QUICK)
    assert cm.report.simulated["throughput_fps"] >= 5e7


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target": "tpu"}, "unknown target 'tpu'; valid targets: int4int2-npu"),
        ({"method": "magic"}, "unknown sensitivity method 'magic'"),
        ({"budget": 0}, "budget must be > 0"),
        ({"budget": -1}, "budget must be > 0"),
        ({"budget": 0.1}, "minimum achievable"),
        ({"method": "alps"}, "needs labelled training data"),
        ({"finetune": 1}, "finetune needs labelled training data"),
        ({"finetune": 1.5}, r"finetune must be a number of epochs >= 0 or a bitmix.FinetuneConfig, got 1.5"),
        ({"finetune": -1}, "finetune must be a number of epochs >= 0"),
        ({"finetune": True}, "finetune must be a number of epochs >= 0"),
        ({"budget": "fast"}, "budget must be a number"),
        ({"data": Data(train=torch.zeros(3))}, "must be a TaskData"),
    ],
)
def test_bad_inputs(digits, kwargs, match):
    model, inputs, _ = digits
    with pytest.raises(BitmixError, match=match):
        bitmix.compile(model, inputs, options=QUICK, **kwargs)


@pytest.mark.parametrize(("example", "match"), [
    *[(bad, r"^example_inputs must be a tensor, a tuple of tensors \(one per forward argument\) or a dict of forward "
            r"argument name -> tensor, got") for bad in (None, 3, ())],
    ({"x": torch.zeros(2, 4)}, r"^example_inputs has 'x', which is not an argument of Linear.forward \(input\)"),
])
def test_example_inputs_that_are_not_tensors(example, match):
    with pytest.raises(BitmixError, match=match):
        bitmix.compile(nn.Linear(4, 2), example, options=QUICK)


def test_an_example_input_that_is_not_a_tensor_is_named():
    """compile(m, (x, 0.5)) said "must be ... a tuple of tensors, got tuple": it is one, its element 1 is not."""
    with pytest.raises(BitmixError, match=r"^example_inputs element 1 is a float \(0.5\), not a tensor: .* keeps its "
                                          "default; leave it out, or wrap the model"):
        bitmix.compile(nn.Linear(4, 2), (torch.zeros(2, 4), 0.5), options=QUICK)

def test_an_empty_example_batch_is_one_line():
    with pytest.raises(BitmixError, match=r"example_inputs hold no examples \(shape \(0, 4\): an empty batch\)"):
        bitmix.compile(nn.Linear(4, 2), torch.zeros(0, 4), options=QUICK)


def test_a_nan_example_without_data_is_named_as_the_example(capfd):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 4)
    x[0, 0] = float("nan")
    with pytest.raises(BitmixError, match="example input 0 contains NaN or Inf, and without data= the example"):
        bitmix.compile(model, x, options=QUICK)
    with pytest.raises(BitmixError, match="the model does not run on the example inputs"):
        bitmix.compile(model, torch.randn(4, 5), options=QUICK)
    assert "Traceback" not in capfd.readouterr().err  # torch's fake-tensor log of the failed trace stays quiet


def test_nan_weights_rejected():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(BitmixError, match="NaN or Inf"):
        bitmix.compile(model, torch.randn(2, 4), options=QUICK)


def test_nan_state_and_meta_weights_rejected():
    """A NaN BatchNorm statistic is folded into the layer before it: refused like a NaN weight, naming it (it
    gave NaN outputs, or "x: contains NaN" for the next layer); an -inf mask buffer is fine."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    model[1].running_var[3] = float("nan")
    with pytest.raises(BitmixError, match=r"buffer '1.running_var' contains NaN; fix the model's state"):
        bitmix.compile(model, torch.randn(2, 4), options=QUICK)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("mask", torch.tensor([0.0, float("-inf"), 0.0, 0.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.fc(x) + self.mask).softmax(-1)

    bitmix.compile(Masked().eval(), torch.randn(2, 4), options=QUICK)
    meta = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to("meta").eval()
    with pytest.raises(BitmixError, match=r"parameter '0.weight' is on the meta device \(no values\); materialise"):
        bitmix.compile(meta, torch.randn(2, 4, device="meta"), options=QUICK)


def test_constant_calibration_warns():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with pytest.warns(UserWarning, match=r"calibration input 0 holds one value \(0\) in every example"):
        cm = bitmix.compile(mlp, (torch.randn(4, 32),), "int8-npu", data=torch.zeros(16, 32),
                            options=CompileOptions(frontier_points=0))
    assert any("holds one value" in w for w in cm.report.warnings)
    x = torch.randn(16, 32)
    with torch.no_grad():  # what the warning is about: real inputs are clipped
        assert float(nn.functional.cosine_similarity(cm(x).flatten(), mlp(x).flatten(), dim=0)) < 0.9


def test_a_capped_loader_is_in_the_reports_warnings(monkeypatch):
    """TaskData.classification's warning that it read a loader only up to MAX_LOADER_BYTES reached the terminal but
    not cm.report.warnings, which holds every other compile warning (report.json, the HTML report)."""
    from bitmix import task

    monkeypatch.setattr(task, "MAX_LOADER_BYTES", 3000)  # one batch: 10 x (16 float32 + an int64 label) = 720 bytes
    torch.manual_seed(0)
    loader = [(torch.randn(10, 16), torch.randint(0, 4, (10,))) for _ in range(8)]
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with pytest.warns(UserWarning, match=r"^Data\(eval=...\) holds more than"):
        cm = bitmix.compile(mlp, torch.randn(4, 16), "int8-npu", data=Data(calibration=loader[0][0], eval=loader),
                            options=QUICK)
    capped = [w for w in cm.report.warnings if "holds more than" in w]
    assert len(capped) == 1 and capped[0].startswith("Data(eval=...) holds more than")
    assert "its first 40 examples" in capped[0]


def test_op_without_kernel_stays_fp32_with_warning():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose1d(4, 8, 3, padding=1, dilation=2)  # dilated: no equivalent conv
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 16)
            self.fc3 = nn.Linear(16, 2)

        def forward(self, x):
            h = self.up(x).mean(-1)
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h)))))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(8, 4, 10)
    with pytest.warns(UserWarning, match="no bitmix kernel"):
        cm = bitmix.compile(net, x, method="eagl", budget=1.0, options=QUICK)
    assert any(r.bits is None and "conv_transpose1d" in r.name for r in cm.report.layers)
    assert cm.report.warnings
    assert [v.kind for v in cm.graph.vector_ops] == ["mean", "relu", "relu"]  # the FP32 op is left out, as warned
    ref = net(x)
    assert torch.nn.functional.cosine_similarity(cm(x), ref, dim=-1).min() > 0.9


def test_a_layer_with_a_reduction_longer_than_the_kernels_take_runs_in_fp32():
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 70000), nn.ReLU(), nn.Linear(70000, 4)).eval()
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match=r"no bitmix kernel .*: 4 \(linear, reduction 70000 > 65536\)"):
        cm = bitmix.compile(net, x, "int8-npu", options=QUICK)
    assert cm.graph.names == ("0", "2")
    assert any(r.bits is None and r.name.startswith("4 (linear") for r in cm.report.layers)
    assert torch.nn.functional.cosine_similarity(cm(x), net(x), dim=-1).min() > 0.99


def test_generic_model_without_data():
    """A model no issue names: grouped conv, bmm, linear; data-free EAGL end to end."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, padding=1, groups=3)
            self.dw = nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=12)
            self.q = nn.Linear(12, 12)
            self.out = nn.Linear(12, 5)

        def forward(self, x):
            h = torch.relu(self.dw(torch.relu(self.conv(x)))).flatten(2).transpose(1, 2)
            q = self.q(h)
            att = torch.softmax(torch.bmm(q, h.transpose(1, 2)), -1)
            return self.out(torch.bmm(att, h).mean(1))

    torch.manual_seed(0)
    cm = bitmix.compile(Odd().eval(), torch.randn(2, 3, 6, 6), "mixed-npu", budget=1.0,
                        options=CompileOptions(frontier_points=2))
    assert {r.kind for r in cm.report.layers} == {"conv2d", "linear", "matmul"}
    assert cm(torch.randn(3, 3, 6, 6)).shape == (3, 5)


def test_frontier_measures_each_distinct_assignment_once(digits, capture_zoo, monkeypatch):
    from bitmix.compiler import pipeline, sensitivity
    from bitmix.compiler.fold import prepare
    from bitmix.ir.targets import get_target
    from bitmix.simulator import load_chip_config, price, simulate

    graph = capture_zoo("digits-cnn")
    target = get_target("int4int2-npu")
    prepared = prepare(graph)
    scores = sensitivity.score("eagl", sensitivity.ScoreContext(graph=graph, target=target, model=prepared))
    quantized = []
    real = pipeline.fake_quantize
    monkeypatch.setattr(pipeline, "fake_quantize", lambda m, a, c: quantized.append(dict(a)) or real(m, a, c))
    calibration = (digits[1][0][:32],)
    front, uniform = pipeline._frontier(graph, prepared, scores, price(graph, target), target,
                                        load_chip_config(target.chip_config), calibration, lambda m: 1.0, 6)
    points = front + uniform
    distinct = {tuple(sorted(p["assignment"].items())) for p in points}
    assert len(quantized) == len(distinct) < len(points)  # all-highest is both a knapsack and a uniform point
    for p in points:
        assert p["quality"] == 1.0
        assert p["throughput_fps"] == simulate(graph, p["assignment"]).throughput_fps


@pytest.mark.parametrize("returns", ["dict", "tuple"])
def test_a_task_on_a_model_with_several_outputs_is_refused_before_the_slow_stages(returns):
    """TaskData scores one tensor; a dict/tuple output failed at the very end with a raw AttributeError."""
    from bitmix.task import Split, TaskData

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor):  # noqa: ANN202
            return {"logits": self.a(x), "aux": self.b(x)} if returns == "dict" else (self.a(x), self.b(x))

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    task = TaskData("t", "cosine", Split((x,), torch.randn(16, 4)), Split((x[:4],), torch.randn(4, 4)))
    with pytest.raises(BitmixError, match="TaskData scores one output tensor.*" + ("'logits'" if returns == "dict"
                                                                                  else "tuple of 2")):
        bitmix.compile(TwoHeads().eval(), (x[:2],), "int8-npu", method="hawq", data=task)


def test_stages_are_logged_for_scripts_without_a_terminal(caplog):
    """A script or CI job sees each stage start and end at INFO on the "bitmix" logger (the spinner is TTY-only)."""
    import logging

    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="bitmix"):
        bitmix.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval(), (torch.randn(4, 8),),
                       "int8-npu", options=CompileOptions(frontier_points=0))
    lines = [r.getMessage() for r in caplog.records if r.name == "bitmix"]
    for stage in ("capture", "price", "lower"):
        assert f"bitmix: {stage} ..." in lines
        assert any(line.startswith(f"bitmix: {stage} done in ") for line in lines)


@pytest.mark.parametrize("budget", [0.01, Budget(fps=1e15)])
def test_an_impossible_budget_is_refused_before_scoring(budget, monkeypatch):
    """The cheapest cost is known once pricing ends: an impossible budget was refused only in allocate, after ALPS
    had pretrained and scored every layer (10.7 s on a 4-layer net, minutes on a real model)."""
    from bitmix.compiler import pipeline
    from bitmix.task import Split, TaskData

    def slow_stage(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a slow stage ran before the budget was checked")

    monkeypatch.setattr(pipeline, "pretrain_stage", slow_stage)
    monkeypatch.setattr(pipeline.sensitivity, "score", slow_stage)
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    task = TaskData("t", "top1", Split((x[:8],), y[:8]), Split((x[8:],), y[8:]))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(512, 4)).eval()
    with pytest.raises(BitmixError, match="infeasible; the (fastest|minimum achievable)"):
        bitmix.compile(model, (x[:2],), "int4int2-npu", method=bitmix.ALPSConfig(epochs=1), budget=budget, data=task,
                       options=QUICK)


def test_the_budget_check_is_timed_with_pricing(monkeypatch):
    """Every second of compile lands in a stage's timing: the early budget check (minutes of exact evaluations on a
    multi-chip model) ran between the `price` and `prepare` stages, in none."""
    import time

    from bitmix.compiler import pipeline

    check = pipeline.check_budget

    def slow_check(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(0.5)
        return check(*args, **kwargs)

    monkeypatch.setattr(pipeline, "check_budget", slow_check)
    torch.manual_seed(0)
    cm = bitmix.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval(), (torch.randn(4, 8),),
                        "int8-npu", options=CompileOptions(frontier_points=0))
    assert cm.report.timings_s["price"] >= 0.5


def test_a_buffer_the_forward_writes_starts_from_the_users_value_not_after_the_compiles_passes():
    import copy

    torch.manual_seed(0)
    model = CallCounter().eval()
    x = torch.randn(16, 8)
    cm = bitmix.compile(model, (x,), "int8-npu", data=x, options=QUICK)
    assert float(model.calls) == 0
    cm.fake_quant.eval()
    with torch.no_grad():
        fake_quant_first = cm.fake_quant(x)
    eager = copy.deepcopy(model)
    first = cm(x)
    assert torch.equal(first, fake_quant_first)
    with torch.no_grad():
        assert (first - eager(x)).abs().max() < 0.05  # call 1 adds 1 (was 10: nine passes inside the compile)
        assert (cm(x) - eager(x)).abs().max() < 0.05  # and calls keep counting, as eager torch does


@pytest.fixture(scope="module")
def from_dicts():
    """`Gated` compiled from a BatchEncoding-like Mapping in another key order than the forward's (leaving out
    `mask` and `scale`), and `KeywordOnly` from a dict; calibrated on tuples in the forward's order."""
    from tests.compiler.test_capture import Encoding, Gated, KeywordOnly

    torch.manual_seed(0)
    x, t = torch.randn(16, 16), torch.randn(16, 8)
    gated, keyword = Gated().eval(), KeywordOnly().eval()
    return {"gated": (gated, bitmix.compile(gated, Encoding(t=t[:4], x=x[:4]), "int8-npu", data=(x, t),
                                            options=QUICK)),
            "keyword": (keyword, bitmix.compile(keyword, {"x": x[:4], "y": t[:4]}, "int8-npu", data=(t, x),
                                                options=QUICK))}


def _calls(name: str, x: torch.Tensor, t: torch.Tensor) -> tuple[tuple, dict, list[tuple[tuple, dict]]]:
    """The original model's call, and every call style the compiled model takes for the same inputs."""
    from tests.compiler.test_capture import Encoding

    if name == "gated":
        return (x,), {"t": t}, [((x, t), {}), ((x,), {"t": t}), ((), {"t": t, "x": x}), ((), Encoding(t=t, x=x))]
    return (t,), {"x": x}, [((t, x), {}), ((t,), {"x": x}), ((), {"x": x, "y": t}), ((), Encoding(x=x, y=t))]


@pytest.mark.parametrize("name", ["gated", "keyword"])
def test_a_model_compiled_from_a_dict_takes_its_inputs_by_position_by_name_or_as_a_dict(from_dicts, name):
    """A dict example (and any keyword-only forward) could not be compiled; now every call style gives the same
    outputs: the kernels' (== fake quant, bit for bit), close to the FP32 model's."""
    model, cm = from_dicts[name]
    x, t = torch.randn(6, 16), torch.randn(6, 8)
    args, kwargs, calls = _calls(name, x, t)
    with torch.no_grad():
        want, fp32 = cm.fake_quant(*calls[0][0]), model(*args, **kwargs)
        for call_args, call_kwargs in calls:
            assert torch.equal(cm(*call_args, **call_kwargs), want)
    assert torch.nn.functional.cosine_similarity(want.flatten(), fp32.flatten(), dim=0) > 0.99
    assert cm.input_spec.names == (("x", "t") if name == "gated" else ("y", "x"))


def test_arguments_fixed_at_compile_time_may_be_passed_at_their_value(from_dicts, tmp_path):
    """cm(x, None, 2.0, t) -- Gated's forward(x, mask=None, scale=2.0, t=None), compiled without mask and scale --
    was refused ("argument 1 is a NoneType"), though eager takes it and the compile fixed mask at None: values equal
    to the fixed ones are taken (by position, as eager binds them, or by name), others are one line."""
    _, cm = from_dicts["gated"]
    x, t = torch.randn(3, 16), torch.randn(3, 8)
    want = cm(x, t)
    for model in (cm, bitmix.load(cm.save(tmp_path / "gated.pt2"))):
        for args, kwargs in (((x, None, 2.0, t), {}), ((x,), {"mask": None, "t": t}), ((x, None), {"t": t}),
                             ((), {"t": t, "scale": 2.0, "x": x, "mask": None})):
            assert torch.equal(model(*args, **kwargs), want)
        for args, kwargs, match in (
                ((x, torch.ones(3, 8), 2.0, t), {}, r"^argument 'mask' was fixed at compile time \(to None, as the "
                                                    r"example inputs left it out\), got a tensor; compile with 'mask'"),
                ((x, None, 3.0, t), {}, r"^argument 2 is a float \(3.0\), not a tensor: .*fixed at compile time"),
                ((x,), {"scale": 2, "t": t}, r"^argument 'scale' is a int \(2\), not a tensor"),
                ((x, None, 2.0, t, t), {}, r"^the model's forward takes 4 positional argument\(s\) \(x, mask, scale, "
                                           r"t\), got 5"),
                ((x, None), {}, "^missing input 't'")):
            with pytest.raises(BitmixError, match=match):
                model(*args, **kwargs)


class _Embedded(nn.Module):
    """Quantized linears between layers that stay FP32 (embedding, position table, LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.pos = nn.Parameter(torch.randn(6, 16))
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.ln(self.emb(ids) + self.pos)))).mean(1)


def _changes_output(model: nn.Module, tensor: torch.Tensor, x: torch.Tensor) -> bool:
    before = model(x)
    saved = tensor.detach().clone()
    with torch.no_grad():
        tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(3)))
    changed = not torch.equal(model(x), before)
    with torch.no_grad():
        tensor.copy_(saved)
    return changed


def test_parameters_and_state_dict_are_what_the_compiled_model_runs(int8, digits, tmp_path):
    """cm.fake_quant was a child module: Adam(cm.parameters()) trained the float twin while cm(x) never changed,
    parameter counts and state_dict() were the twin's float weights, and cm.train() took the twin off the kernels'
    integer path. Now every parameter and buffer of the compiled (and loaded) model changes its outputs, the twin
    stays a trainable attribute, and a model with nothing left FP32 has no parameters at all."""
    import copy

    cm = copy.deepcopy(int8)  # every layer quantized
    assert list(cm.parameters()) == [] and not any(k.startswith("fake_quant") for k in cm.state_dict())
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.Adam(cm.parameters())
    twin = list(cm.fake_quant.parameters())
    assert twin and all(p.requires_grad for p in twin)
    assert not {id(m) for m in cm.fake_quant.modules()} & {id(m) for m in cm.modules()}
    x = digits[2].test.inputs[0][:4]
    cm.train()
    with torch.no_grad():
        assert not cm.fake_quant.training and torch.equal(cm.fake_quant(x), cm(x))
    cm.fake_quant = cm.fake_quant  # assigned again, still not a child
    assert list(cm.parameters()) == [] and "fake_quant" not in dict(cm.named_children())

    torch.manual_seed(0)
    ids = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(1))
    cm = bitmix.compile(_Embedded().eval(), (ids,), "int4int2-npu", budget=1.0, data=ids, options=QUICK)
    loaded = bitmix.load(cm.save(tmp_path / "embedded.pt2"))
    for model, root in ((cm, "lowered."), (loaded, "module.")):
        named = dict(model.named_parameters())
        assert sorted(named) == sorted(f"{root}{k}" for k in ("emb.weight", "pos", "ln.weight", "ln.bias"))
        assert all(k.startswith(root) for k in model.state_dict())
        assert all(_changes_output(model, p, ids) for p in named.values())
    assert torch.equal(loaded(ids), cm(ids))


def test_compiled_and_loaded_models_start_in_eval_mode(int8, tmp_path):
    """`cm.training` was True right after compile and load (nn.Module's default) while everything under it ran the
    model's eval mode: a user checking `model.training` before serving was told it was training."""
    loaded = bitmix.load(int8.save(tmp_path / "eval.pt2"))
    assert not int8.training and not int8.lowered.training and not int8.fake_quant.training
    assert not loaded.training
