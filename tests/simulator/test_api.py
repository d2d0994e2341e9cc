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

