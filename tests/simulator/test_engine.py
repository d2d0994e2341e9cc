"""Cycle-level engine vs analytic twin, and precision scaling as the hardware behaves."""

import pytest

from bitmix.simulator import simulate, simulate_calls, uniform

from .conftest import conv, linear

ZOO = ["digits-cnn", "digits-mlp", "minilm", "resnet18", "resnet50", "mobilenetv2", "bert-base"]


@pytest.mark.parametrize("name", ZOO)
def test_analytic_matches_cycle_level(zoo_graph, name):
    graph = zoo_graph(name)
    for bits in (8, 4, 2):
        a = simulate(graph, uniform(graph, bits), engine="analytic")
        c = simulate(graph, uniform(graph, bits), engine="cycle")
        assert a.cycles == pytest.approx(c.cycles, rel=0.05), (name, bits)
        assert a.energy_per_frame_j == pytest.approx(c.energy_per_frame_j, rel=0.05), (name, bits)


def test_mixed_assignment_agrees(zoo_graph):
    graph = zoo_graph("resnet18")
    mixed = {name: (8, 4, 2)[i % 3] for i, name in enumerate(graph.names)}
    a, c = simulate(graph, mixed), simulate(graph, mixed, engine="cycle")
    assert a.cycles == pytest.approx(c.cycles, rel=0.05)


def _layer_speedups(layer):
    cycles = {b: simulate_calls([layer], {layer.name: b}).layers[0] for b in (8, 4, 2)}
    return cycles[8].cycles / cycles[4].cycles, cycles[4].cycles / cycles[2].cycles, cycles


def test_compute_bound_layer_nearly_doubles_per_step():
    # a wide 3x3 conv: every core busy with many lane passes
    up84, up42, res = _layer_speedups(conv("wide", 512, 512, 28))
    assert res[8].bound == "compute"
    assert 1.7 < up84 <= 2.0 and 1.6 < up42 <= 2.0


def test_partial_sum_and_vector_bound_layers_gain_less():
    # one token through a tall linear: the reduction is split, int32 partial sums do not shrink with bits
    # (K = 8 x 1023 has no power-of-two block to rotate over at 4/2-bit inputs: bitmix.ir.rotation)
    up84, up42, res = _layer_speedups(linear("gemv", 8184, 256, rows=1))
    assert up84 < 1.5 and up42 < 1.5
    assert res[2].bound in ("noc_psum", "vector", "noc_model")
    # depthwise conv: the MAC array is mostly idle, FP vector work and NoC latency dominate
    dw84, dw42, _ = _layer_speedups(conv("dw", 256, 256, 14, groups=256))
    assert dw84 < 1.5 and dw42 < 1.5


def test_breakdown_explains_the_bound():
    layer = linear("gemv", 8184, 256, rows=1)  # no rotation block (see above)
    r = simulate_calls([layer], {layer.name: 2}).layers[0]
    assert r.stage_cycles[r.bound] == max(r.stage_cycles.values())
    assert r.stage_cycles[r.bound] > r.stage_cycles["compute"]
