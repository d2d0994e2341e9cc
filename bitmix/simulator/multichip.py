"""Multi-chip pipelines: split a network whose weights do not fit one chip over PCIe cards.

NorthPole has no off-chip memory, so IBM splits large networks into sub-networks
that fit each chip's model memory and chains the chips as a pipeline over PCIe
(northpole_sim.md §1.3). Stages are contiguous runs of layers in execution order,
packed greedily, which minimises the chip count for a contiguous split. Each chip's
core SRAM must hold its stage's weights, every core's program for those layers, and
the largest double-buffered activation working set among them.
"""

from __future__ import annotations

from bitmix.ir.cost import StageSpan, pack_stages
from bitmix.ir.precision import Precision, as_precision
from bitmix.simulator.config import ChipConfig
from bitmix.simulator.mapping import LayerWork, weight_bytes


def activation_bytes(work: LayerWork, bits: Precision | int) -> int:
    """Double-buffered input + output of a layer (inputs at its activation width, outputs at 8 bits)."""
    gm, a = work.gemm, as_precision(bits).a
    return 2 * (-(-gm.in_elems * a // 8) + -(-gm.operand_elems * a // 8) + gm.out_elems)


def partition(works: list[LayerWork], assignment: dict[str, Precision], chip: ChipConfig) -> list[StageSpan]:
    """Greedy contiguous packing of layers into chips (`bitmix.ir.cost.pack_stages`, which the
    cost model shares); fails if one layer alone cannot fit."""
    bits = [assignment[w.layer.name] for w in works]
    return pack_stages([weight_bytes(w.layer, b) for w, b in zip(works, bits, strict=True)],
                       [activation_bytes(w, b) for w, b in zip(works, bits, strict=True)],
                       chip.sram_bytes, program_bytes(chip), [w.layer.name for w in works])


def program_bytes(chip: ChipConfig) -> int:
    """SRAM one layer's program takes on every core."""
    return chip.cores * chip.program_bytes_per_layer


def transfer_bytes(works: list[LayerWork], assignment: dict[str, Precision], stage: StageSpan) -> int:
    """Activations crossing PCIe into the next stage (`input_bytes` of its first layer)."""
    if stage.stop >= len(works):
        return 0
    nxt = works[stage.stop]
    return input_bytes(nxt, assignment[nxt.layer.name])


def input_bytes(work: LayerWork, bits: Precision | int) -> int:
    """What crosses PCIe when a chip boundary falls before a layer: its inputs at its activation width, and
    the tensors made earlier that later ops read (`Layer.crossing`, a skip branch) at 8 bits."""
    return -(-(work.gemm.in_elems + work.gemm.operand_elems) * as_precision(bits).a // 8) + work.layer.crossing


def transfer_seconds(nbytes: int, chip: ChipConfig) -> float:
    if nbytes == 0:
        return 0.0
    return chip.pcie.latency_s + nbytes / chip.pcie.bandwidth_bytes_s
