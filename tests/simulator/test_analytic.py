import pytest

from bitmix.ir.targets import get_target
from bitmix.simulator import LayerCost, price, simulate, uniform


def test_price_covers_every_layer_and_precision(zoo_graph):
    graph = zoo_graph("resnet50")
    target = get_target("int4int2-npu")
    table = price(graph, target)  # its wall time (< 0.5 s goal) is measured in benchmarks/simulator.py
    assert set(table) == set(graph.names)
    for row in table.values():
        assert tuple(row) == target.all_bits == (8, 4, 2)
        assert all(isinstance(c, LayerCost) and c.cycles > 0 and c.energy_j > 0 for c in row.values())
    assert table["fc"][4].sram_bytes == pytest.approx(2048 * 1000 / 2 + 4 * 1000)


def test_price_columns_sum_to_simulate(zoo_graph):
    graph = zoo_graph("resnet18")
    table = price(graph, get_target("mixed-npu"))
    for bits in (8, 4, 2):
        r = simulate(graph, uniform(graph, bits))
        assert sum(row[bits].cycles for row in table.values()) == pytest.approx(r.cycles, rel=1e-6)
        assert sum(row[bits].energy_j for row in table.values()) == pytest.approx(r.energy_per_frame_j, rel=1e-6)
