"""The end-to-end speed bench times what it names: eager FP32 and the compiled model, same inputs."""

import json

import numba

from bitmix.tools import speed


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
