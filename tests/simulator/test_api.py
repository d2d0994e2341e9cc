import json

import pytest

from bitmix.errors import BitmixError
from bitmix.simulator import simulate, simulate_calls, uniform

from .conftest import conv


def test_to_dict_is_json_safe_and_has_report_keys(zoo_graph):
    graph = zoo_graph("digits-cnn")
    r = simulate(graph, uniform(graph, 4))
    d = json.loads(json.dumps(r.to_dict()))
    for key in ("cycles", "latency_s", "throughput_fps", "energy_per_frame_j", "power_w", "fps_per_w",
                "utilization", "chips"):
        assert key in d
    assert len(d["layers"]) == len(graph.layers)
    assert r.table().row_count == len(graph.layers) + 1


def test_batch_means_frames():
    one = [conv("a", 64, 64, 28, batch=1)]
    eight = [conv("a", 64, 64, 28, batch=8)]
    r1, r8 = simulate_calls(one, {"a": 8}), simulate_calls(eight, {"a": 8})
    assert r8.frames == 8
    assert r8.latency_s > r1.latency_s
    assert r8.throughput_fps > r1.throughput_fps  # the bigger batch fills the array better
    assert r8.energy_per_frame_j < 2 * r1.energy_per_frame_j


def test_bad_assignments():
    layers = [conv("a", 64, 64, 28)]
    with pytest.raises(BitmixError, match="no precision for layer 'a'"):
        simulate_calls(layers, {})
    with pytest.raises(BitmixError, match="unknown precision"):
        simulate_calls(layers, {"a": 3})
    with pytest.raises(BitmixError, match="unknown engine"):
        simulate_calls(layers, {"a": 8}, engine="spice")



def test_frames_are_the_inputs_batch_where_a_layer_runs_sequence_first():
    import torch
    from torch import nn

    import bitmix
    from bitmix.compiler.capture import capture
    from bitmix.simulator import price

    class Attention(nn.Module):  # batch-first outside, (T, B, D) inside nn.MultiheadAttention
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    model = Attention().eval()
    for batch, seq in ((1, 16), (3, 16), (2, 40)):
        graph = capture(model, (torch.randn(batch, seq, 64),))
        assert graph.layers[0].input_shape[0] == seq  # what frames was read from before
        r = simulate(graph, uniform(graph, 8))
        assert r.frames == batch and r.throughput_fps == pytest.approx(batch / r.latency_s)
        assert price(graph, bitmix.targets["int8-npu"]).frames == batch
    cm = bitmix.compile(model, (torch.randn(2, 16, 64),), "int8-npu", options=bitmix.CompileOptions(frontier_points=0))
    assert cm.report.simulated["frames"] == 2
    cm(torch.randn(5, 16, 64))
    assert cm.simulate().frames == 5
