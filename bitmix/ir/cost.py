"""Per-layer, per-precision cost: the contract between the simulator and the allocator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    """What running one layer at one precision costs on the target chip, per frame."""

    cycles: float
    energy_j: float
    sram_bytes: int  # weight bytes resident in core SRAM at this precision


CostTable = dict[str, dict[int, LayerCost]]  # CostTable[layer_name][bits]
