"""Multi-chip pipelines: split a network whose weights do not fit one chip over PCIe cards.

NorthPole has no off-chip memory, so IBM splits large networks into sub-networks
that fit each chip's model memory and chains the chips as a pipeline over PCIe
(northpole_sim.md §1.3). Stages are contiguous runs of layers in execution order,
packed greedily, which minimises the chip count for a contiguous split. Each chip's
core SRAM must hold its stage's weights, every core's program for those layers, and
the largest double-buffered activation working set among them.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitmix.errors import BitmixError
from bitmix.simulator.config import ChipConfig
from bitmix.simulator.mapping import LayerWork, weight_bytes


@dataclass(frozen=True)
class Stage:
    start: int  # index of the first layer
    stop: int  # one past the last layer
    weight_bytes: int
    capacity_bytes: int


def activation_bytes(work: LayerWork, bits: int) -> int:
    """Double-buffered input + output of a layer (inputs at its precision, outputs at 8 bits)."""
    gm = work.gemm
    return 2 * (-(-gm.in_elems * bits // 8) + -(-gm.operand_elems * bits // 8) + gm.out_elems)


def stage_capacity(chip: ChipConfig, layers: int, act_bytes: int) -> int:
    """Core SRAM left for weights once programs and activations have their share."""
    return chip.sram_bytes - chip.cores * chip.program_bytes_per_layer * layers - act_bytes


def partition(works: list[LayerWork], assignment: dict[str, int], chip: ChipConfig) -> list[Stage]:
    """Greedy contiguous packing of layers into chips; fails if one layer alone cannot fit."""
    stages: list[Stage] = []
    start, wsum, act = 0, 0, 0
    for i, w in enumerate(works):
        bits = assignment[w.layer.name]
        wb, ab = weight_bytes(w.layer, bits), activation_bytes(w, bits)
        alone = stage_capacity(chip, 1, ab)
        if wb > alone:
            raise BitmixError(
                f"layer {w.layer.name!r} needs {wb / 2**20:.1f} MiB of weights at {bits} bits plus "
                f"{ab / 2**20:.1f} MiB of activations, but one chip has {chip.sram_bytes / 2**20:.1f} MiB "
                f"(cores x core_sram_bytes); lower its precision or raise chip.core_sram_bytes"
            )
        if i > start and wsum + wb > stage_capacity(chip, i + 1 - start, max(act, ab)):
            stages.append(Stage(start, i, wsum, stage_capacity(chip, i - start, act)))
            start, wsum, act = i, 0, 0
        wsum += wb
        act = max(act, ab)
    stages.append(Stage(start, len(works), wsum, stage_capacity(chip, len(works) - start, act)))
    return stages


def transfer_bytes(works: list[LayerWork], assignment: dict[str, int], stage: Stage) -> int:
    """Activations crossing PCIe into the next stage: the next layer's inputs at its precision."""
    if stage.stop >= len(works):
        return 0
    nxt = works[stage.stop]
    bits = assignment[nxt.layer.name]
    return -(-(nxt.gemm.in_elems + nxt.gemm.operand_elems) * bits // 8)


def transfer_seconds(nbytes: int, chip: ChipConfig) -> float:
    if nbytes == 0:
        return 0.0
    return chip.pcie.latency_s + nbytes / chip.pcie.bandwidth_bytes_s
