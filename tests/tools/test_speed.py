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
    assert bits[0] == 4 and bits[-1] == 8 and set(bits) <= {4, 8}  # all-4-bit, first/last pinned to 8
