"""One 3x3 convolution on a 2x2-core chip, every cycle and joule worked out by hand from the config.

Chip (`CHIP`): 2x2 cores at 1 GHz, the NorthPole MAC array (2048 int8 MACs/cycle/core as
`mac_out_lanes` = 32 output lanes x 64 reduction lanes), 8 rows per pipelined block, 4-cycle MAC
and vector pipelines, 64 vector ops/cycle, Activation NoC 1024 b/cycle, Model NoC 512 b/cycle,
Instruction NoC 256 b/cycle, 1 cycle per hop; a 64-byte program per layer; an energy table of round
numbers (per action: MAC 1 pJ, 8-bit register word 0.5 pJ, SRAM 0.01 pJ/bit, any NoC 0.1 pJ/bit-hop,
vector op 2 pJ) and 1 W static power.

Layer: conv 4 -> 8 channels, 3x3, padding 1, on one 4x4 frame. As a GEMM: P = 16 output pixels,
K = 4*9 = 36, N = 8; 4608 MACs; 288 weights; 64 input and 128 output elements.

Mapping. K = 36 <= 64 reduction lanes and N = 8 <= 32 output lanes, so one lane pass covers a
core's whole tile and its MAC array needs one cycle per output row. Splitting rows four ways
(p4: 4 rows per core) is the only split with 4 rows per core (any other leaves >= 6), and splitting
K or N adds cores without removing a row, so the mapper picks g1 x p4 x k1 x n1.

Cycles of the busiest core (all four are alike: 4 rows, 1 block of <= 8 rows):
- inputs: 64 elements x 8 bits / 4 cores = 128 bits -> 128 / 1024 = 0.125 cycles on the Activation NoC;
  the cores sit at rows y = 0, 0, 1, 1 of the mesh and are fed from the frame buffer at the y = 0
  edge: y + 1 = 1, 1, 2, 2 hops; the farthest is 2 cycles away;
- MAC array: 4 rows x 1 pass = 4 cycles; no partial sums (K not split);
- vector unit: 128 outputs / 4 cores = 32 requantizations / 64 per cycle = 0.5 cycles;
- body = 2 + 0.125 + 4 + 0.5 + 4 (MAC latency) + 4 (vector latency) = 14.625 cycles.
Prefetch of the next layer (this one again, next frame): the program 64 x 8 / 256 = 2 cycles plus
the mesh diameter 2 = 4 cycles; the weights: a core's slice is 36 x 8 x 8 = 2304 bits, of which
288 x 8 / 4 = 576 are resident, so 1728 bits stream at 512 b/cycle = 3.375 cycles after 1 hop
(corner to the mean weight home) = 4.375 cycles. The layer lasts max(14.625, 4.375) = 14.625
cycles = 14.625 ns; one frame per run, so 1 / 14.625 ns = 68,376,068 frames/s.

Energy per frame (counts x the table):
- MAC: 4608 x 1 pJ = 4608 pJ; register words: 4608 x 8/8 x 0.5 pJ = 2304 pJ;
- SRAM reads: per core 4 rows x 36 x 8 bits of input (one output-lane block) = 1152 plus its 2304
  weight bits once per block = 3456, x 4 cores = 13,824 bits; writes: the 128 input bits received
  plus 1728 streamed weight bits = 1856, x 4 = 7424 bits; (13,824 + 7424) x 0.01 pJ = 212.48 pJ;
- Activation NoC: 4 x 128 bits x 1.5 mean hops = 768 bit-hops; Model NoC: 4 x 1728 bits x 1 mean
  hop (2x2 mesh: (4-1)/6 + (4-1)/6) = 6912; Instruction NoC: 64 x 8 bits x 4 cores = 2048;
  (768 + 6912 + 2048) x 0.1 pJ = 76.8 + 691.2 + 204.8 pJ;
- vector: 128 x 2 pJ = 256 pJ; static: 1 W x 14.625 ns = 14,625 pJ.
Total 4608 + 2304 + 212.48 + 76.8 + 691.2 + 204.8 + 256 + 14,625 = 22,978.28 pJ.
"""

import pytest

from bitmix.simulator import ChipConfig, EnergyRow, EnergyTable, simulate_calls, uniform
from bitmix.simulator.config import NocConfig

from .conftest import conv

PJ = 1e-12
ENERGY = EnergyTable(rows=(
    EnergyRow("mac", "compute", 8, 12, 1.0, "round number for the test"),
    EnergyRow("regfile", "access", 8, 12, 0.5, "round number for the test"),
    EnergyRow("sram", "read", 1, 12, 0.01, "round number for the test"),
    EnergyRow("sram", "write", 1, 12, 0.01, "round number for the test"),
    *(EnergyRow(noc, "hop", 1, 12, 0.1, "round number for the test")
      for noc in ("noc_psum", "noc_act", "noc_model", "noc_instr")),
    EnergyRow("vector", "op", 16, 12, 2.0, "round number for the test"),
    EnergyRow("pcie", "transfer", 1, 12, 5.0, "round number for the test"),
), static_power_w=1.0)
CHIP = ChipConfig(cores_x=2, cores_y=2, clock_hz=1e9, ops_per_cycle_int8=2048, mac_out_lanes=32, pipeline_rows=8,
                  mac_latency_cycles=4, vector_latency_cycles=4, vector_ops_per_cycle=64, program_bytes_per_layer=64,
                  noc_act=NocConfig(1024, 1), noc_model=NocConfig(512, 1), noc_instr=NocConfig(256, 1),
                  noc_psum=NocConfig(1024, 1), energy=ENERGY)
BREAKDOWN_PJ = {"mac": 4608.0, "regfile": 2304.0, "sram": 212.48, "noc_psum": 0.0, "noc_act": 76.8,
                "noc_model": 691.2, "noc_instr": 204.8, "vector": 256.0, "static": 14625.0, "pcie": 0.0}


@pytest.mark.parametrize("engine", ["analytic", "cycle"])
def test_small_conv_on_a_2x2_chip(engine):
    layer = conv("c", 4, 8, 4)
    assert (layer.macs, layer.params) == (4608, 288)
    r = simulate_calls([layer], uniform([layer], 8), config=CHIP, engine=engine)
    (lr,) = r.layers
    assert lr.mapping == "g1xp4xk1xn1" and lr.cores_used == 4
    assert lr.cycles == pytest.approx(14.625, abs=1e-9)
    assert r.latency_s == pytest.approx(14.625e-9, rel=1e-12)
    assert r.throughput_fps == pytest.approx(1 / 14.625e-9, rel=1e-12)
    for component, pj in BREAKDOWN_PJ.items():
        assert r.energy_breakdown_j[component] == pytest.approx(pj * PJ, rel=1e-9, abs=1e-24), component
    assert r.energy_per_frame_j == pytest.approx(22978.28 * PJ, rel=1e-9)
