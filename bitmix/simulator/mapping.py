"""Mapping: how one layer spreads over the core array and what moves over which NoC.

Every quantizable layer is viewed as G independent GEMMs of P rows (output pixels or
tokens) x K reduction x N outputs. The core array is split four ways: groups (s_g),
rows (s_p, spatial tiles), reduction (s_k: input channels x taps, whose partial sums
are summed along a chain of neighbours on the Partial-Sum NoC) and output channels
(s_n). Inside a core the MAC array is `red_lanes(b) x mac_out_lanes`; it is weight
stationary, so each lane pass loads one weight block and streams a block of rows
through it. Small groups (depthwise) are packed block-diagonally into one pass.

Weights of the whole network stay resident, spread evenly over every core's SRAM;
during a layer the Model NoC streams each core the part of its slice it does not
hold. Input activations arrive over the Activation NoC (multicast to the s_n cores
that share them); the second operand of an activation x activation matmul does too.
Programs (Instruction NoC) and weight slices (Model NoC) for a layer arrive while the
previous layer runs, so a layer lasts max(its own body, the next layer's prefetch).

A precision is a pair (weight bits w, activation bits a). Assumption, after northpole_sim.md:
the MAC array runs in the mode of the wider operand (§6.1: "b the compute mode =
max(b_weight, b_activation)"; §5: the datapath is SIMD-packed into 8-bit words, so a narrow
weight occupies a wide activation's lane), so the lanes, MAC rate and MAC energy follow
`max(w, a)`; weights are stored, resident and streamed over the Model NoC at w bits; input
activations (and a matmul's second operand, an activation too) move over the Activation NoC
and are read by the MAC array at a bits (§5: "memory and NoC energy per operand scale with b").

The mapper enumerates splits and keeps the one with the fewest cycles by the closed
form `body_cycles` below, which the analytic engine also uses (Timeloop-style: the
model is the mapper's objective).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from bitmix.errors import BitmixError
from bitmix.ir.graph import Layer, VectorOp
from bitmix.ir.precision import Precision, as_precision
from bitmix.ir.rotation import rotation_block, rotation_ops_per_element
from bitmix.ir.row_steps import ROW_MAX_OPS_PER_INPUT, ROW_STEP_OPS_PER_OUTPUT, row_steps
from bitmix.simulator.config import ChipConfig, check_bits

# Vector-unit multiply-adds per output element of a non-quantized op [A: op counts of the
# usual kernels]. BN and ReLU-like clamps fold into the per-channel requantization every
# layer output already gets (scale, bias, clamp), so they cost nothing extra.
VECTOR_OPS_PER_ELEMENT: dict[str, float] = {
    "batch_norm": 0.0, "relu": 0.0, "relu_": 0.0, "hardtanh": 0.0, "hardtanh_": 0.0, "relu6": 0.0,
    "clamp": 0.0, "dropout": 0.0,
    "layer_norm": 5.0,  # mean, centre, square-accumulate, normalise, affine
    "softmax": 8.0,  # max, subtract, exp (~4 by polynomial), sum, scale
    "gelu": 8.0, "silu": 6.0, "sigmoid": 5.0, "tanh": 6.0, "exp": 4.0,
    "max_pool2d": 9.0,  # 3x3 window compare per output
}
# Ops whose cost scales with the inputs they reduce (one add per input element).
REDUCING_OPS = frozenset({"mean", "sum", "adaptive_avg_pool2d", "avg_pool2d"})
REQUANT_OPS_PER_OUTPUT = 1.0  # scale-bias-clamp of each layer output on the vector unit


def vector_op_count(op: VectorOp) -> float:
    """Vector-unit operations one VectorOp costs."""
    if op.kind in REDUCING_OPS:
        return float(op.input_elements)
    return VECTOR_OPS_PER_ELEMENT.get(op.kind, 1.0) * op.elements


def vector_sram_elements(op: VectorOp) -> float:
    """FP16 elements read and written by a VectorOp (lookups read only what they return)."""
    if VECTOR_OPS_PER_ELEMENT.get(op.kind, 1.0) == 0.0:
        return 0.0
    return min(op.input_elements, 2 * op.elements) + op.elements


@dataclass(frozen=True)
class Gemm:
    """The workload of one layer: G GEMMs of rows x red x cols, plus tensor sizes."""

    groups: int
    rows: int
    red: int
    cols: int
    frames: int
    in_elems: int
    out_elems: int
    weight_elems: int  # resident weights (0 for matmul)
    operand_elems: int  # second activation operand of a matmul (0 otherwise)

    @property
    def macs(self) -> int:
        return self.groups * self.rows * self.red * self.cols


def gemm_view(layer: Layer) -> Gemm:
    """Read a Layer record as G x (P x K x N); batch > 1 multiplies rows (frames)."""
    frames = int(layer.input_shape[0]) if len(layer.input_shape) > 1 else 1
    out = layer.output_shape
    if layer.kind == "conv2d":
        if len(out) != 4 or len(layer.weight_shape) != 4:
            raise BitmixError(f"layer {layer.name!r}: conv2d needs 4-D output and weight shapes, got {out}")
        cout, cin_g, kh, kw = layer.weight_shape
        g = max(1, layer.groups)
        return Gemm(g, out[0] * out[2] * out[3], cin_g * kh * kw, cout // g, frames,
                    layer.input_elements, layer.output_elements, layer.weight_elements, 0)
    if layer.kind == "linear":
        n, k = layer.weight_shape[0], layer.weight_shape[-1]
        return Gemm(1, max(1, layer.output_elements // n), k, n, frames,
                    layer.input_elements, layer.output_elements, layer.weight_elements, 0)
    if layer.kind == "matmul":
        g = math.prod(out[:-2]) if len(out) > 2 else 1
        operand = math.prod(layer.weight_shape)
        return Gemm(g, out[-2] if len(out) >= 2 else 1, layer.input_shape[-1], out[-1], frames,
                    layer.input_elements, layer.output_elements, 0, operand)
    raise BitmixError(f"layer {layer.name!r}: unknown kind {layer.kind!r}; expected conv2d, linear or matmul")


@dataclass(frozen=True)
class LayerWork:
    """A layer plus the vector ops scheduled after it (their ops and FP16 SRAM traffic)."""

    layer: Layer
    gemm: Gemm
    vector_ops: float  # requantize + attached VectorOps, in vector-unit operations
    vector_sram_elems: float


def layer_works(layers: tuple[Layer, ...] | list[Layer], vector_ops: tuple[VectorOp, ...] | list[VectorOp] = ()
                ) -> list[LayerWork]:
    """Attach each VectorOp to the layer it follows (ops before any layer go to the first)."""
    if not layers:
        raise BitmixError("nothing to simulate: the layer list is empty; capture a model with conv/linear layers")
    names = {layer.name for layer in layers}
    ops: dict[str, float] = {layer.name: 0.0 for layer in layers}
    sram: dict[str, float] = {layer.name: 0.0 for layer in layers}
    for op in vector_ops:
        owner = op.after if op.after in names else layers[0].name
        ops[owner] += vector_op_count(op)
        sram[owner] += vector_sram_elements(op)
    works = []
    for layer in layers:
        gemm = gemm_view(layer)
        works.append(LayerWork(layer, gemm, gemm.out_elems * REQUANT_OPS_PER_OUTPUT + ops[layer.name],
                               sram[layer.name]))
    return works


def at_precision(work: LayerWork, bits: Precision) -> LayerWork:
    """`work` plus the precision-dependent vector work: per-row activation steps (`bitmix.ir.row_steps`), a max
    over every input element and a multiply per output, and the online input rotation (`bitmix.ir.rotation`),
    one pass over the layer's input in FP16 on the vector unit."""
    gemm = work.gemm
    if row_steps(work.layer.kind, bits):
        ops = ((gemm.in_elems + gemm.operand_elems) * ROW_MAX_OPS_PER_INPUT
               + gemm.out_elems * ROW_STEP_OPS_PER_OUTPUT)
        work = replace(work, vector_ops=work.vector_ops + float(ops))
    block = rotation_block(work.layer.kind, gemm.red, bits, work.layer.input_nonneg)
    if block is None:
        return work
    elems = float(gemm.in_elems)
    return replace(work, vector_ops=work.vector_ops + elems * rotation_ops_per_element(block),
                   vector_sram_elems=work.vector_sram_elems + 2 * elems)


@dataclass(frozen=True)
class Mapping:
    """A chosen split of one layer at one precision, with the busiest core's work."""

    bits: Precision
    s_g: int
    s_p: int
    s_k: int
    s_n: int
    g_c: int  # per-core tile (ceil; the busiest core)
    p_c: int
    k_c: int
    n_c: int
    pack: int  # groups packed block-diagonally per lane pass
    red_lanes: int
    out_lanes: int

    @property
    def cores_used(self) -> int:
        return self.s_g * self.s_p * self.s_k * self.s_n

    @property
    def passes_per_row(self) -> int:
        return _passes(self.g_c, self.k_c, self.n_c, self.pack, self.red_lanes, self.out_lanes)

    def describe(self) -> str:
        return f"g{self.s_g}xp{self.s_p}xk{self.s_k}xn{self.s_n}"


def _passes(g, k, n, pack, kl, nl):  # works on ints and numpy arrays alike
    return -(-g // pack) * -(-k // kl) * -(-n // nl)


def _smooth(limit: int) -> list[int]:
    return sorted({2**a * 3**b * 7**c for a in range(31) for b in range(20) for c in range(12)
                   if 2**a * 3**b * 7**c <= limit})


@cache
def _split_table(cores: int) -> np.ndarray:
    """All (s_g, s_p, s_k, s_n) with 2^a 3^b 7^c factors and product <= cores."""
    values = _smooth(cores)
    rows = [t + (s,) for t in itertools.product(values, repeat=3) if math.prod(t) <= cores
            for s in values if s * math.prod(t) <= cores]
    return np.array(rows, dtype=np.int64)


@dataclass(frozen=True)
class CoreWork:
    """Per-core quantities of a mapping in cycles and bits (arrays over candidates or cores)."""

    compute: np.ndarray  # MAC-array cycles
    blocks: np.ndarray  # weight blocks (lane passes per row)
    rows: np.ndarray
    in_bits: np.ndarray  # input activations received
    operand_bits: np.ndarray  # matmul second operand received (Activation NoC)
    stream_bits: np.ndarray  # weights received over the Model NoC
    psum_bits: np.ndarray  # partial sums sent to the chain neighbour (0 when s_k = 1)
    vector_ops: np.ndarray  # vector-unit ops on the chain's root core
    weight_bits: np.ndarray  # the core's weight (or matmul operand) slice
    in_read_bits: np.ndarray  # input reads by the MAC array: once per output-lane block


def core_work(gm: Gemm, vector_ops: float, bits: Precision, chip: ChipConfig, g, p, k, n, sends_psum) -> CoreWork:
    """What one core with tile (g, p, k, n) does and receives; arguments may be arrays.

    `sends_psum` marks cores that pass partial sums down the reduction chain (all but its
    root); the root applies the vector-unit work to the reduced outputs. Lanes follow the MAC
    mode `bits.compute`, weights the weight width, activations (matmul operands too) the activation width.
    """
    kl, nl = chip.red_lanes(bits.compute), chip.mac_out_lanes
    g, p, k, n = (np.asarray(v, dtype=np.int64) for v in (g, p, k, n))
    pack = np.where(g > 1, np.clip(np.minimum(kl // np.maximum(k, 1), nl // np.maximum(n, 1)), 1, g), 1)
    blocks = _passes(g, k, n, pack, kl, nl) * (p > 0) * (k > 0) * (n > 0)
    share_in = (g / gm.groups) * (k / gm.red) * (p / gm.rows)
    share_out = (g / gm.groups) * (n / gm.cols) * (p / gm.rows)
    matmul = gm.operand_elems > 0
    w_bits = (g * k * n * (bits.a if matmul else bits.w)).astype(np.float64)
    resident_bits_per_core = gm.weight_elems * bits.w / chip.cores
    sends = np.asarray(sends_psum, dtype=bool)
    return CoreWork(
        compute=(p * blocks).astype(np.float64),
        blocks=blocks,
        rows=p,
        in_bits=gm.in_elems * share_in * bits.a,
        operand_bits=w_bits * matmul,
        stream_bits=np.maximum(0.0, w_bits - resident_bits_per_core) * (gm.weight_elems > 0),
        psum_bits=np.where(sends, g * p * n * chip.psum_bits, 0).astype(np.float64),
        vector_ops=np.where(sends, 0.0, vector_ops * share_out),
        weight_bits=w_bits,
        in_read_bits=(p * g * k * bits.a * np.where(pack > 1, 1, -(-n // nl))).astype(np.float64),
    )


def block_stages(cw: CoreWork, chip: ChipConfig) -> tuple[np.ndarray, ...]:
    """Per core: blocks of `pipeline_rows` rows, and each block's cycles on the Activation NoC, MAC
    array, partial-sum link and vector unit (both engines build on these)."""
    nblk = np.maximum(1, -(-cw.rows // chip.pipeline_rows))
    return (nblk, cw.in_bits / chip.noc_act.width_bits / nblk, cw.compute / nblk,
            cw.psum_bits / chip.noc_psum.width_bits / nblk, cw.vector_ops / chip.vector_ops_per_cycle / nblk)


def act_start_cycles(cw: CoreWork, chip: ChipConfig, act_hops) -> np.ndarray:
    """When a core's first activation block can arrive: producer hops, then a matmul's second operand."""
    return act_hops * chip.noc_act.hop_cycles + cw.operand_bits / chip.noc_act.width_bits


def flow_cycles(cw: CoreWork, chip: ChipConfig, act_hops, chain_hops) -> np.ndarray:
    """Closed-form body cycles of a layer on a core (a deterministic flow line, see engine.py).

    Blocks of `pipeline_rows` rows pass four stages: Activation-NoC delivery, MAC array,
    partial-sum chain, vector unit; a matmul's second operand is delivered first. Finish =
    first block through every stage + the slowest stage for each further block + latencies.
    Weights and the program are already on the core (prefetched, see `prefetch_cycles`).
    """
    nblk, a, c, ps, v = block_stages(cw, chip)
    lat_a = act_start_cycles(cw, chip, act_hops)
    first = lat_a + a + c
    mac_done = np.maximum(first + (nblk - 1) * c, lat_a + nblk * a + c)
    chain = chain_hops * chip.noc_psum.hop_cycles
    psum_done = np.where(ps > 0, np.maximum(mac_done + chain + ps, first + chain + nblk * ps), mac_done)
    vec_done = np.maximum(psum_done + v, first + np.where(ps > 0, chain + ps, 0) + nblk * v)
    return vec_done + chip.mac_latency_cycles + chip.vector_latency_cycles


def prefetch_cycles(cw: CoreWork, chip: ChipConfig, model_hops) -> np.ndarray:
    """Cycles to bring a layer's program (Instruction NoC) and weight slice (Model NoC) to a core.

    Both load while the previous layer runs, so that "data and programs are present on each
    core before use" (Science 2023, Axiom 9): they only cost time beyond that layer's body.
    """
    weights = model_hops * chip.noc_model.hop_cycles + cw.stream_bits / chip.noc_model.width_bits
    return np.maximum(program_cycles(chip), np.where(cw.stream_bits > 0, weights, 0.0))


def _busiest(sender: CoreWork, root: CoreWork) -> CoreWork:
    """A virtual core that sends partial sums and also does the root's vector work: an upper bound."""
    return CoreWork(sender.compute, sender.blocks, sender.rows, sender.in_bits, sender.operand_bits,
                    sender.stream_bits, sender.psum_bits, root.vector_ops, sender.weight_bits,
                    sender.in_read_bits)


def stage_cycles(cw: CoreWork, chip: ChipConfig) -> dict[str, float]:
    """Busy cycles of each resource on a core: the breakdown that says what bounds a layer."""
    return {
        "compute": float(cw.compute),
        "noc_act": float((cw.in_bits + cw.operand_bits) / chip.noc_act.width_bits),
        "noc_model": float(cw.stream_bits / chip.noc_model.width_bits),
        "noc_psum": float(cw.psum_bits / chip.noc_psum.width_bits),
        "vector": float(cw.vector_ops / chip.vector_ops_per_cycle),
    }


def program_cycles(chip: ChipConfig) -> float:
    """Cycles to broadcast one layer's program to every core over the Instruction NoC."""
    return chip.program_bytes_per_layer * 8 / chip.noc_instr.width_bits + chip.diameter_hops * chip.noc_instr.hop_cycles


def map_layer(work: LayerWork, bits: Precision | int, chip: ChipConfig) -> Mapping:
    """The split with the fewest closed-form cycles (ties: fewer cores, less traffic)."""
    bits = as_precision(bits)
    check_bits(bits)
    return _map(work.gemm, at_precision(work, bits).vector_ops, bits, chip)


@cache
def _map(gm: Gemm, vector_ops: float, bits: Precision, chip: ChipConfig) -> Mapping:
    table = _split_table(chip.cores)
    ok = (table[:, 0] <= gm.groups) & (table[:, 1] <= gm.rows) & (table[:, 2] <= gm.red) & (table[:, 3] <= gm.cols)
    cand = table[ok]
    s_g, s_p, s_k, s_n = cand.T
    g, p, k, n = (-(-gm.groups // s_g), -(-gm.rows // s_p), -(-gm.red // s_k), -(-gm.cols // s_n))
    cw = core_work(gm, vector_ops, bits, chip, g, p, k, n, s_k > 1)
    root = core_work(gm, vector_ops, bits, chip, g, p, k, n, np.zeros_like(s_k, dtype=bool))
    busiest = _busiest(cw, root)
    cycles = np.maximum(flow_cycles(busiest, chip, chip.mean_hops, s_k - 1),
                        prefetch_cycles(busiest, chip, weight_home_hops(chip)))
    cores = s_g * s_p * s_k * s_n
    traffic = (cw.in_bits + cw.stream_bits + cw.psum_bits) * cores
    best = int(np.lexsort((traffic, cores, np.round(cycles, 6)))[0])
    kl, nl = chip.red_lanes(bits.compute), chip.mac_out_lanes
    gb, kb, nb = int(g[best]), int(k[best]), int(n[best])
    pack = max(1, min(kl // kb, nl // nb, gb)) if gb > 1 else 1
    return Mapping(bits, int(s_g[best]), int(s_p[best]), int(s_k[best]), int(s_n[best]),
                   gb, int(p[best]), kb, nb, pack, kl, nl)


def tiles(total: int, split: int) -> np.ndarray:
    """Sizes of the `split` ceil-blocked tiles of a dimension (trailing tiles may be short or 0)."""
    step = -(-total // split)
    starts = np.arange(split) * step
    return np.clip(total - starts, 0, step)


def placement(m: Mapping, chip: ChipConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid position of each used core and its split indices.

    Cores are numbered with the reduction index fastest (so a partial-sum chain sits on
    consecutive cores), then output channels, rows and groups, and laid out on the mesh
    in snake order, so consecutive numbers are neighbours. Returns (x, y, index[g,p,k,n]).
    """
    idx = np.indices((m.s_g, m.s_p, m.s_n, m.s_k)).reshape(4, -1)
    gi, pi, ni, ki = idx
    lin = np.arange(idx.shape[1])
    y = lin // chip.cores_x
    x = np.where(y % 2 == 0, lin % chip.cores_x, chip.cores_x - 1 - lin % chip.cores_x)
    return x, y, np.stack([gi, pi, ki, ni])


def weight_bytes(layer: Layer, bits: Precision | int) -> int:
    """Resident bytes of a layer at its weight width: packed weights plus int32 biases (0 for matmul)."""
    if layer.kind == "matmul":
        return 0
    return -(-layer.weight_elements * as_precision(bits).w // 8) + 4 * max(0, layer.params - layer.weight_elements)


@dataclass(frozen=True)
class Cores:
    """Every used core of a mapping: grid position, split indices and its work."""

    x: np.ndarray
    y: np.ndarray
    gi: np.ndarray
    pi: np.ndarray
    ki: np.ndarray
    ni: np.ndarray
    work: CoreWork


def cores_of(work: LayerWork, m: Mapping, chip: ChipConfig) -> Cores:
    """Per-core tiles (edge tiles are short) and placement of a mapping."""
    gm = work.gemm
    x, y, (gi, pi, ki, ni) = placement(m, chip)
    g = tiles(gm.groups, m.s_g)[gi]
    p = tiles(gm.rows, m.s_p)[pi]
    k = tiles(gm.red, m.s_k)[ki]
    n = tiles(gm.cols, m.s_n)[ni]
    return Cores(x, y, gi, pi, ki, ni, core_work(gm, work.vector_ops, m.bits, chip, g, p, k, n, ki > 0))


def busiest_core(work: LayerWork, m: Mapping, chip: ChipConfig) -> CoreWork:
    """The ceil-sized tile, as a sender that also does the root's vector work."""
    gm = work.gemm
    tile = (m.g_c, m.p_c, m.k_c, m.n_c)
    sender = core_work(gm, work.vector_ops, m.bits, chip, *tile, m.s_k > 1)
    root = core_work(gm, work.vector_ops, m.bits, chip, *tile, False)
    return _busiest(sender, root)


def producer_hops(cores: Cores, prev: Cores | None) -> np.ndarray:
    """Hops from the core that produced each core's input tile (previous layer's chain root).

    A core needs rows (and groups) in the same proportion of the tensor as it computes,
    and input channels that the previous layer's output-channel split spread over its
    cores. The first layer is fed from the frame buffer at row 0's edge of the array.
    """
    if prev is None:
        return (cores.y + 1).astype(np.float64)
    s_g, s_p, s_k = (int(a.max()) + 1 for a in (cores.gi, cores.pi, cores.ki))
    pg, pp, pn = (int(a.max()) + 1 for a in (prev.gi, prev.pi, prev.ni))
    roots = prev.ki == 0
    grid = np.zeros((pg, pp, pn, 2), dtype=np.int64)
    grid[prev.gi[roots], prev.pi[roots], prev.ni[roots]] = np.stack([prev.x[roots], prev.y[roots]], axis=1)
    src = grid[((cores.gi + 0.5) / s_g * pg).astype(np.int64), ((cores.pi + 0.5) / s_p * pp).astype(np.int64),
               ((cores.ki + 0.5) / s_k * pn).astype(np.int64)]
    return (np.abs(cores.x - src[:, 0]) + np.abs(cores.y - src[:, 1])).astype(np.float64)


def weight_home_hops(chip: ChipConfig) -> float:
    """Mean hops from the worst (corner) core to the weight homes spread over the array."""
    return (chip.cores_x - 1) / 2 + (chip.cores_y - 1) / 2


def clear_mapping_cache() -> None:
    """Forget chosen mappings (for cold-start timing)."""
    _map.cache_clear()
