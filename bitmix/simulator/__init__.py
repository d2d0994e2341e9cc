"""NorthPole-style accelerator simulator: chip config, mapping, cycle-level and analytic engines.

`price(graph, target)` gives the allocator its CostModel (Σ terms = `simulate`); `simulate(graph, assignment)`
gives the report its latency, throughput, energy and chip count.
"""

from bitmix.ir.cost import CostModel, LayerCost
from bitmix.simulator.api import ENGINES, simulate, simulate_calls, uniform
from bitmix.simulator.config import ChipConfig, EnergyRow, EnergyTable, load_chip_config
from bitmix.simulator.costmodel import price
from bitmix.simulator.result import LayerResult, SimResult, StageResult

__all__ = [
    "ENGINES", "ChipConfig", "CostModel", "EnergyRow", "EnergyTable", "LayerCost", "LayerResult", "SimResult",
    "StageResult", "load_chip_config", "price", "simulate", "simulate_calls", "uniform",
]
