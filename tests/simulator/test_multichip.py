import pytest

from bitmix.errors import BitmixError
from bitmix.simulator import ChipConfig, simulate, simulate_calls, uniform

from .conftest import linear, llm_stack


def test_3b_stack_at_4_bits_pipelines_over_chips():
    layers = llm_stack()
    assert sum(layer.params for layer in layers) == pytest.approx(3.0e9, rel=0.01)
    r = simulate_calls(layers, uniform(layers, 4), model="llm-3b")
    weights = 3.0e9 / 2
    assert weights / ChipConfig().sram_bytes <= r.chips <= 2 * weights / ChipConfig().sram_bytes
    assert len(r.stages) == r.chips and r.stages[-1].transfer_bytes == 0
    assert all(s.weight_bytes <= s.capacity_bytes for s in r.stages)
    assert all(s.transfer_bytes > 0 and s.transfer_s > 0 for s in r.stages[:-1])
    assert r.latency_s > r.pipeline_period_s
    assert r.energy_breakdown_j["pcie"] > 0
    r8 = simulate_calls(layers, uniform(layers, 8))
    assert r8.chips > r.chips


def test_bert_base_at_8_bits(zoo_graph):
    graph = zoo_graph("bert-base")
    r = simulate(graph, uniform(graph, 8))
    assert r.chips == 1  # 85.6 M linear weights = 86 MB < 192 MiB of core SRAM
    small = ChipConfig(core_sram_bytes=256 * 1024)  # a 64 MiB chip must split it
    r_small = simulate(graph, uniform(graph, 8), small)
    assert r_small.chips == 2
    assert r_small.stages[0].transfer_bytes > 0


def test_layer_too_big_for_one_chip():
    huge = linear("huge", 16384, 16384)  # 256 MiB at 8 bits
    with pytest.raises(BitmixError, match="layer 'huge' needs 256.0 MiB") as err:
        simulate_calls([huge], {"huge": 8})
    assert "\n" not in str(err.value)
    assert simulate_calls([huge], {"huge": 4}).chips == 1
