import pytest

from bitmix.simulator import simulate_calls, uniform
from bitmix.simulator.config import ChipConfig, EnergyTable
from bitmix.simulator.energy import COMPONENTS

from .conftest import conv


def test_breakdown_sums_and_scales_with_bits():
    layers = [conv("a", 64, 64, 56), conv("b", 64, 128, 28)]
    results = {b: simulate_calls(layers, uniform(layers, b)) for b in (8, 4, 2)}
    for r in results.values():
        assert set(r.energy_breakdown_j) == set(COMPONENTS)
        assert sum(r.energy_breakdown_j.values()) == pytest.approx(r.energy_per_frame_j)
    mac = [results[b].energy_breakdown_j["mac"] for b in (8, 4, 2)]
    assert mac[0] > mac[1] > mac[2]
    assert results[8].energy_per_frame_j > results[4].energy_per_frame_j > results[2].energy_per_frame_j


def test_static_energy_is_power_times_time():
    layers = [conv("a", 64, 64, 56)]
    quiet = ChipConfig(energy=EnergyTable(static_power_w=0.0))
    loud = ChipConfig(energy=EnergyTable(static_power_w=10.0))
    r0, r1 = simulate_calls(layers, uniform(layers, 8), config=quiet), simulate_calls(layers, uniform(layers, 8),
                                                                                      config=loud)
    assert r0.energy_breakdown_j["static"] == 0
    assert r1.energy_per_frame_j - r0.energy_per_frame_j == pytest.approx(10.0 * r1.latency_s)
