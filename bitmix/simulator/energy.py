"""Energy: action counts x energy per action (the chip's table), plus static power x time.

Counts come from the mapping: MACs at the layer's precision, operand-register words
(one per 8-bit lane word, so packed 4/2-bit operands cost proportionally less), SRAM
bits read and written, bit-hops on each NoC, vector-unit operations. The static term
(leakage, clock, control) is charged per second of wall time, so slow layers and idle
pipeline stages pay for it, as SCALE-Sim v3 found decisive (northpole_sim.md §3.6).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from bitmix.ir.precision import Precision, as_precision
from bitmix.simulator.config import ChipConfig, EnergyTable
from bitmix.simulator.mapping import CoreWork, Gemm, LayerWork

COMPONENTS = ("mac", "regfile", "sram", "noc_psum", "noc_act", "noc_model", "noc_instr", "vector", "static",
              "pcie")
VECTOR_ELEMENT_BITS = 16  # the vector unit works in FP16 (Horowitz FP16 rows in the table)


@dataclass(frozen=True)
class ActionCounts:
    """Actions one layer performs per run (all frames of its batch)."""

    macs: float
    lane_words: float
    sram_read_bits: float
    sram_write_bits: float
    noc_psum_bit_hops: float
    noc_act_bit_hops: float
    noc_model_bit_hops: float
    noc_instr_bit_hops: float
    vector_ops: float

    def __add__(self, other: ActionCounts) -> ActionCounts:
        return ActionCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def count_actions(gm: Gemm, work: LayerWork, bits: Precision, chip: ChipConfig, cw: CoreWork,
                  act_hops: np.ndarray | float, model_hops: np.ndarray | float) -> ActionCounts:
    """Sum one layer's actions over its cores (arrays in `cw` are per core)."""
    nblk = np.maximum(1, -(-cw.rows // chip.pipeline_rows))
    received = cw.in_bits + cw.operand_bits
    vec_bits = work.vector_sram_elems * VECTOR_ELEMENT_BITS
    return ActionCounts(
        macs=float(gm.macs),
        lane_words=gm.macs * bits.compute / 8,
        sram_read_bits=float(np.sum(cw.in_read_bits + cw.weight_bits * nblk + cw.psum_bits)) + vec_bits,
        sram_write_bits=float(np.sum(received + cw.stream_bits + cw.psum_bits)) + vec_bits,
        noc_psum_bit_hops=float(np.sum(cw.psum_bits)),
        noc_act_bit_hops=float(np.sum(received * act_hops)),
        noc_model_bit_hops=float(np.sum(cw.stream_bits * model_hops)),
        noc_instr_bit_hops=chip.program_bytes_per_layer * 8.0 * chip.cores,
        vector_ops=float(work.vector_ops),
    )


def dynamic_energy(counts: ActionCounts, bits: Precision | int, table: EnergyTable) -> dict[str, float]:
    """Joules per component for one layer's actions (a MAC costs what its mode, the wider operand, costs)."""
    return {
        "mac": counts.macs * table.lookup("mac", "compute", as_precision(bits).compute),
        "regfile": counts.lane_words * table.lookup("regfile", "access", 8),
        "sram": counts.sram_read_bits * table.lookup("sram", "read")
        + counts.sram_write_bits * table.lookup("sram", "write"),
        "noc_psum": counts.noc_psum_bit_hops * table.lookup("noc_psum", "hop"),
        "noc_act": counts.noc_act_bit_hops * table.lookup("noc_act", "hop"),
        "noc_model": counts.noc_model_bit_hops * table.lookup("noc_model", "hop"),
        "noc_instr": counts.noc_instr_bit_hops * table.lookup("noc_instr", "hop"),
        "vector": counts.vector_ops * table.lookup("vector", "op", 16),
    }


def static_energy(seconds: float, table: EnergyTable) -> float:
    return seconds * table.static_power_w


def pcie_energy(nbytes: float, table: EnergyTable) -> float:
    return nbytes * 8 * table.lookup("pcie", "transfer")
