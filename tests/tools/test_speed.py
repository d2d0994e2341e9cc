"""The end-to-end speed bench times what it names: eager FP32 and the compiled model, same inputs."""

import json

import numba
import pytest

import bitmix
from bitmix.tools import ort_baseline, speed


def test_records_compare_eager_and_compiled(tmp_path):
    path = tmp_path / "speed.json"
    recs = speed.run_model_bench(["digits-mlp"], repeats=3, json_path=str(path))
    assert json.loads(path.read_text()) == recs
    (r,) = recs
    assert r["model"] == "digits-mlp" and r["input_shapes"] == [[256, 1, 8, 8]]
    assert r["eager_fp32_s"] > 0 and r["compiled_s"] > 0 and r["compile_s"] > 0
    assert r["threading_layer"] == numba.threading_layer()
    bits = r["bits"]
    assert bits[0] == "4/4" and bits[-1] == "8/8" and set(bits) <= {"4/4", "8/8"}  # all-4-bit, first/last pinned to 8
    assert r["ort_int8_s"] > 0 and r["vs_ort_int8"] == r["ort_int8_s"] / r["compiled_s"]
    counts = sorted({"1", str(r["threads"])})
    for base, seconds in (("eager", "eager_fp32_s"), ("ort", "ort_int8_s")):  # each baseline at its faster count
        by_threads = r[f"{seconds}_by_threads"]
        assert sorted(by_threads) == counts and r[seconds] == min(by_threads.values())
        assert by_threads[str(r[f"{base}_threads"])] == r[seconds]
    assert r["speedup"] == r["eager_fp32_s"] / r["compiled_s"] and r["target"] == "int4int2-npu"


def test_the_bench_compiles_at_the_target_asked_for():
    """`bitmix bench model --target int8-npu` compares like for like with ORT int8: every layer 8/8."""
    (r,) = speed.run_model_bench(["digits-mlp"], repeats=1, ort=False, target="int8-npu")
    assert r["target"] == "int8-npu" and set(r["bits"]) == {"8/8"} and r["ort_int8_s"] is None


@pytest.mark.parametrize("eager_cost, ort_cost", [({1: 5.0, 2: 50.0}, {1: 3.0, 2: 1.0}),
                                                  ({1: 50.0, 2: 5.0}, {1: 1.0, 2: 3.0})])
def test_baselines_are_compared_at_their_faster_thread_count(monkeypatch, eager_cost, ort_cost):
    """Eager torch and ORT are each timed at 1 and at N threads and compared at the faster, named in the record,
    so a collapse of one thread pool on a loaded machine cannot inflate a ratio (a fake clock: eager's cost
    depends on the torch thread count its call runs at, ORT's on its session's intra-op threads)."""
    import torch

    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])

    class Eager(torch.nn.Module):
        def forward(self, x):
            clock[0] += eager_cost[torch.get_num_threads()]
            return x

    class Compiled:
        assignment = {"a": 4, "b": 8}

        def __call__(self, x):
            clock[0] += 2.0
            return x

    def sessions(model, inputs, data, counts):
        assert counts == (1, 2)

        def session(n):
            def run():
                clock[0] += ort_cost[n]
            return run
        return {n: session(n) for n in counts}

    monkeypatch.setattr(speed.zoo, "load", lambda name: (Eager(), (torch.zeros(1),), None))
    monkeypatch.setattr(bitmix, "compile", lambda *args, **kwargs: Compiled())
    monkeypatch.setattr(ort_baseline, "ort_int8_sessions", sessions)
    before = torch.get_num_threads()
    try:
        r = speed.bench_model("fake", repeats=5, threads=2)
        assert torch.get_num_threads() == 2  # left at the machine's count for the next model
    finally:
        torch.set_num_threads(before)
    eager_threads = min(eager_cost, key=eager_cost.__getitem__)
    ort_threads = min(ort_cost, key=ort_cost.__getitem__)
    assert r["eager_fp32_s_by_threads"] == {str(n): t for n, t in eager_cost.items()}
    assert r["eager_threads"] == eager_threads and r["eager_fp32_s"] == 5.0 and r["speedup"] == 2.5
    assert r["ort_int8_s_by_threads"] == {str(n): t for n, t in ort_cost.items()}
    assert r["ort_threads"] == ort_threads and r["ort_int8_s"] == 1.0 and r["vs_ort_int8"] == 0.5
    assert r["compiled_s"] == 2.0 and r["bits"] == ["4/4", "8/8"]


def test_ort_baseline_runs_an_int8_model_close_to_fp32():
    """The ORT column times a statically quantized (QDQ int8) export of the same model on the same input."""
    import torch

    from bitmix import zoo
    from bitmix.tools.ort_baseline import ort_int8_session

    model, inputs, data = zoo.load("digits-mlp")
    (got,) = ort_int8_session(model, inputs, data, threads=1)()
    with torch.no_grad():
        want = model(*inputs).numpy()
    assert got.shape == want.shape and not (got == want).all()  # quantized, not the FP32 graph
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.9


def test_ort_node_times_name_the_torch_modules_they_ran():
    """``module_path`` turns every conv node of ORT's profile into the module it was exported from, a
    ``Sequential``'s children and a branch ORT may reorder included (``profile_layers --ort`` pairs by it)."""
    import torch
    from torch import nn

    from bitmix.tools.ort_baseline import module_path, ort_int8_node_times

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c, 8, 3, padding=1)
            self.downsample = nn.Sequential(nn.Conv2d(c, 8, 1))

        def forward(self, x):
            return torch.relu(self.conv1(x)) + self.downsample(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(Block(4), Block(8)))
    model.eval()
    inputs = (torch.randn(1, 3, 8, 8),)
    nodes = ort_int8_node_times(model, inputs, None, threads=1, runs=2)
    convs = [module_path(node) for node, op, _ in nodes if op in ("QLinearConv", "ConvInteger", "Conv")]
    want = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert sorted(convs) == sorted(want) and len(want) == 5
    assert module_path("/layer1/layer1.0/downsample/downsample.0/Conv_token_5") == "layer1.0.downsample.0"
    assert module_path("/conv1/Conv") == "conv1"


def test_interleaved_medians_times_blocks_in_turn(monkeypatch):
    """Each contender runs ``rounds`` blocks of warm-up + timed calls, the blocks alternating; the median is
    over its timed calls only (a fake clock: each call advances it by the contender's cost)."""
    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    order = []

    def contender(name, costs):
        calls = iter(costs)

        def fn():
            order.append(name)
            clock[0] += next(calls)
        return fn

    # a: warm-up calls cost 100 (never timed), timed calls 1..6; b: 7 everywhere
    a_costs = [100, 100, 1, 2, 100, 100, 3, 4, 100, 100, 5, 6]
    medians = speed.interleaved_medians({"a": contender("a", a_costs), "b": contender("b", [7] * 12)},
                                        repeats=6, rounds=3, warmup=2)
    assert order == (["a"] * 4 + ["b"] * 4) * 3
    assert medians == {"a": 4, "b": 7}


def test_ort_fidelity_baseline_scores_the_given_held_out_inputs():
    """`benchmarks/quality.py --ort`: ORT calibrated on given rows, one output row per held-out input."""
    import torch
    import torch.nn.functional as F

    from bitmix.tools.ort_baseline import ort_int8_outputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    calibration, test = (torch.randn(8, 16),), (torch.randn(5, 16),)
    got = ort_int8_outputs(model, calibration, test)
    with torch.no_grad():
        want = model(*test)
    assert got.shape == (5, 4) and not torch.equal(got, want)  # quantized, not the FP32 graph
    assert F.cosine_similarity(got, want, dim=-1).min() > 0.99


def test_ort_baseline_quantizes_a_weight_normed_model():
    """ORT's symbolic shape inference raised a TypeError on a weight-normed model's export; the baseline falls back
    to ONNX's own shape inference."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils import parametrizations

    from bitmix.tools.ort_baseline import ort_int8_outputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                parametrizations.weight_norm(torch.nn.Linear(8 * 6 * 6, 16)), torch.nn.SiLU(),
                                torch.nn.Linear(16, 4)).eval()
    calibration, test = (torch.randn(8, 3, 8, 8),), (torch.randn(5, 3, 8, 8),)
    got = ort_int8_outputs(model, calibration, test)
    with torch.no_grad():
        want = model(*test)
    assert got.shape == (5, 4) and not torch.equal(got, want)
    assert F.cosine_similarity(got, want, dim=-1).min() > 0.99


def test_ort_baseline_exports_torch_attention_layers():
    """`nn.TransformerEncoderLayer` / `nn.MultiheadAttention` in eval mode take a fused fast path the ONNX exporter
    cannot write (UnsupportedOperatorError); the baseline exports them as their plain ops."""
    import torch
    import torch.nn.functional as F

    from bitmix.tools.ort_baseline import ort_int8_outputs

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    calibration, test = (torch.randn(8, 6, 32),), (torch.randn(5, 6, 32),)
    got = ort_int8_outputs(model, calibration, test)
    with torch.no_grad():
        want = model(*test).flatten(1)
    assert got.shape == want.shape and F.cosine_similarity(got, want, dim=-1).min() > 0.95
    assert torch.backends.mha.get_fastpath_enabled()  # restored
