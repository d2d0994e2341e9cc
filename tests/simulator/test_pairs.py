"""A precision pair on the simulator: MAC mode of the wider operand, weights at w, activations at a."""

import pytest

from bitmix.errors import BitmixError
from bitmix.ir.precision import Precision
from bitmix.simulator import ChipConfig, simulate, simulate_calls
from bitmix.simulator.engine import simulate_layer
from bitmix.simulator.mapping import core_work, layer_works

from .conftest import conv, linear


def _one(layer, p):
    return simulate_calls([layer], {layer.name: p}).layers[0]


def test_weight_bytes_follow_weight_width_and_time_the_wider_operand():
    layer = conv("wide", 512, 512, 28)
    r88, r48, r44 = (_one(layer, p) for p in (Precision(8, 8), Precision(4, 8), Precision(4, 4)))
    assert r48.weight_bytes == r44.weight_bytes < r88.weight_bytes
    # compute bound: 4/8 runs in 8-bit mode, so it is as slow as 8/8, not as fast as 4/4
    assert r48.bound == "compute"
    assert r48.stage_cycles["compute"] == r88.stage_cycles["compute"] > r44.stage_cycles["compute"]


def test_activation_traffic_follows_activation_width():
    """Same tile on a core: inputs scale with a, weights (resident, streamed) with w, lanes with max(w, a)."""
    work = layer_works([linear("fc", 1024, 1024, rows=64)])[0]
    chip = ChipConfig()
    cw = {p: core_work(work.gemm, work.vector_ops, p, chip, 1, 8, 256, 64, False)
          for p in (Precision(2, 8), Precision(2, 4), Precision(2, 2), Precision(4, 8))}
    assert cw[Precision(2, 8)].in_bits == 2 * cw[Precision(2, 4)].in_bits == 4 * cw[Precision(2, 2)].in_bits
    assert cw[Precision(2, 8)].weight_bits == cw[Precision(2, 2)].weight_bits == cw[Precision(4, 8)].weight_bits / 2
    assert cw[Precision(2, 8)].stream_bits == cw[Precision(2, 2)].stream_bits
    assert cw[Precision(2, 8)].compute == cw[Precision(4, 8)].compute > cw[Precision(2, 2)].compute


def test_int_is_shorthand_for_the_equal_pair():
    layer = conv("c", 64, 64, 28)
    assert _one(layer, 4) == _one(layer, Precision(4, 4))
    assert _one(layer, "4/8") == _one(layer, Precision(4, 8))


@pytest.mark.parametrize("bad", [Precision(8, 4), "8/2", (4, 2)])
def test_weight_wider_than_activation_is_refused(bad):
    with pytest.raises(BitmixError, match="weights wider than activations") as err:
        _one(conv("c", 64, 64, 28), bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("p", [Precision(4, 8), Precision(2, 4)])
def test_analytic_matches_cycle_level_on_pairs(zoo_graph, p):
    graph = zoo_graph("resnet18")
    assignment = {name: p for name in graph.names}
    a, c = simulate(graph, assignment), simulate(graph, assignment, engine="cycle")
    assert a.cycles == pytest.approx(c.cycles, rel=0.05)
    assert a.energy_per_frame_j == pytest.approx(c.energy_per_frame_j, rel=0.05)


def test_rotated_inputs_and_row_steps_cost_vector_work_at_narrow_activations_only():
    """A linear at <= 4-bit activations pays the online Hadamard rotation (bitmix.ir.rotation): one sign flip
    and log2(b) butterflies per input element on the vector unit, and their FP16 traffic; at 4 bits also its
    per-row steps (bitmix.ir.row_steps): a max per input element, a multiply per output element; a 4/8 linear pays the
    row steps (beside narrower weights) without the rotation."""
    layer = linear("fc", 384, 384, rows=64)
    work = layer_works([layer])[0]
    base = work.vector_ops
    counts = {p: simulate_layer(work, p, ChipConfig(), None)[0].counts
              for p in (Precision(8, 8), Precision(4, 8), Precision(4, 4), Precision(2, 2))}
    assert counts[Precision(8, 8)].vector_ops == base
    assert counts[Precision(4, 8)].vector_ops == base + 64 * 384 * (1 + 1)
    assert counts[Precision(2, 2)].vector_ops == base + 64 * 384 * (1 + 7)
    assert counts[Precision(4, 4)].vector_ops == base + 64 * 384 * (1 + 7 + 1 + 1)


def test_a_rotated_8_bit_pair_pays_the_rotation_on_top_of_its_plain_pair():
    """4/8r is 4/8 plus the rotation's sign flip and log2(b) butterflies per input element; a conv, which the
    rule never rotates, costs the same at 4/8r as at 4/8."""
    work = layer_works([linear("fc", 384, 384, rows=64)])[0]
    counts = {p: simulate_layer(work, p, ChipConfig(), None)[0].counts
              for p in (Precision(4, 8), Precision(4, 8, True), Precision(8, 8), Precision(8, 8, True))}
    assert counts[Precision(4, 8, True)].vector_ops == counts[Precision(4, 8)].vector_ops + 64 * 384 * (1 + 7)
    assert counts[Precision(8, 8, True)].vector_ops == counts[Precision(8, 8)].vector_ops + 64 * 384 * (1 + 7)
    layer = linear("fc", 384, 384, rows=64)
    assert _one(layer, "4/8r").cycles > _one(layer, "4/8").cycles
    assert _one(layer, "4/8r").energy_j > _one(layer, "4/8").energy_j
    c = conv("c", 64, 64, 28)
    assert _one(c, "4/8r").cycles == _one(c, "4/8").cycles
