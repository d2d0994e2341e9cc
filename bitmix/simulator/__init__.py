"""NorthPole-style accelerator simulator: chip config, mapping, cycle-level and analytic engines.

`price(graph, target)` gives the allocator its CostTable; `simulate(graph, assignment)`
gives the report its latency, throughput, energy and chip count.
"""

from bitmix.ir.cost import CostTable, LayerCost
from bitmix.simulator.analytic import price
from bitmix.simulator.api import ENGINES, simulate, simulate_calls, uniform
from bitmix.simulator.config import ChipConfig, EnergyRow, EnergyTable, load_chip_config
from bitmix.simulator.result import LayerResult, SimResult, StageResult

__all__ = [
    "ENGINES", "ChipConfig", "CostTable", "EnergyRow", "EnergyTable", "LayerCost", "LayerResult", "SimResult",
    "StageResult", "load_chip_config", "price", "simulate", "simulate_calls", "uniform",
]
