"""Costs: the contract between the simulator and the allocator.

`CostModel` is the simulator's whole-model price in a form a solver can optimise: unary
terms per layer and choice, plus pairwise terms between consecutive layers in execution
order (layer i -> layer i+1, and the last layer -> the first, whose prefetch the last
layer overlaps). On one chip Σ terms *is* `simulate()`; when an assignment's weights do
not fit one chip, `evaluate` re-sums each chip's run as a chip of its own (its first layer fed from the
frame buffer, its last overlapping its own first layer's prefetch) and adds the pipeline terms (PCIe
hand-offs, idle static power), by the same greedy packing `simulator.multichip` uses, so the two cannot drift.
All costs are per frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bitmix.errors import BitmixError
from bitmix.ir.precision import Precision

RESOURCES = ("cycles", "energy_j", "sram_bytes")


@dataclass(frozen=True)
class LayerCost:
    """Totals of one resource set (per frame)."""

    cycles: float
    energy_j: float
    sram_bytes: int  # weight bytes resident in core SRAM


@dataclass(frozen=True)
class StageSpan:
    start: int  # index of the first layer
    stop: int  # one past the last layer
    weight_bytes: int
    capacity_bytes: int


def fits_one_chip(weight_bytes: int, act_bytes: int, sram_bytes: int, program_bytes: int) -> bool:
    """Whether one layer alone fits a chip: its weights, its program and its activations (`pack_stages`)."""
    return weight_bytes <= sram_bytes - program_bytes - act_bytes


def pack_stages(weight_bytes: Sequence[int], act_bytes: Sequence[int], sram_bytes: int, program_bytes: int,
                names: Sequence[str] = ()) -> list[StageSpan]:
    """Greedy contiguous packing of layers into chips (minimises the chip count of a contiguous split).

    A chip's SRAM holds its layers' weights, one program per layer (`program_bytes`, all
    cores) and the largest double-buffered activation working set among them.
    """
    def capacity(layers: int, act: int) -> int:
        return sram_bytes - program_bytes * layers - act

    stages: list[StageSpan] = []
    start, wsum, act = 0, 0, 0
    for i, (wb, ab) in enumerate(zip(weight_bytes, act_bytes, strict=True)):
        if not fits_one_chip(wb, ab, sram_bytes, program_bytes):
            name = names[i] if names else f"#{i}"
            raise BitmixError(
                f"layer {name!r} needs {size_text(wb)} of weights plus {size_text(ab)} of activations, but one chip "
                f"has {size_text(sram_bytes)} (cores x core_sram_bytes) and its programs take "
                f"{size_text(program_bytes)} per layer; "
                f"lower its precision or raise chip.core_sram_bytes")
        if i > start and wsum + wb > capacity(i + 1 - start, max(act, ab)):
            stages.append(StageSpan(start, i, wsum, capacity(i - start, act)))
            start, wsum, act = i, 0, 0
        wsum += wb
        act = max(act, ab)
    stages.append(StageSpan(start, len(weight_bytes), wsum, capacity(len(weight_bytes) - start, act)))
    return stages


def size_text(nbytes: int) -> str:
    """A byte count in the largest of MiB / KiB / bytes it reaches."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


@dataclass(frozen=True)
class ChipLimits:
    """What the multi-chip terms need from the chip: SRAM, PCIe, static power, clock."""

    sram_bytes: int
    program_bytes: int  # one layer's program on every core
    pcie_latency_s: float
    pcie_bytes_per_s: float
    pcie_j_per_byte: float
    static_power_w: float
    clock_hz: float

    def transfer_s(self, nbytes: int) -> float:
        return 0.0 if nbytes == 0 else self.pcie_latency_s + nbytes / self.pcie_bytes_per_s


@dataclass(frozen=True)
class Evaluation:
    """The exact cost of one assignment (per frame), as `simulate()` reports it."""

    cycles: float
    energy_j: float
    sram_bytes: int
    chips: int
    period_s: float  # pipeline period of a run (all frames); fps = frames / period_s

    def value(self, resource: str) -> float:
        return float(getattr(self, resource))


@dataclass(frozen=True, eq=False)
class CostModel:
    """Unary [layer][choice] and pairwise [edge][(choice_i, choice_next)] costs per resource.

    Edge i joins layer i to layer (i + 1) mod n. `enter` and `hold` split each layer's
    cycles (per run) into what depends on its producer (enter[i]: prev x own; enter[0]:
    1 x own) and what overlaps the next layer's prefetch (hold[i]: own x next), so that a
    multi-chip stage's time can be summed. `xfer_bytes[i]` is what crosses PCIe if a chip
    boundary falls before layer i.
    """

    names: tuple[str, ...]
    choices: tuple[tuple, ...]  # per layer, highest first: `Precision` pairs (or opaque keys)
    frames: int
    unary: dict[str, tuple[np.ndarray, ...]]
    pair: dict[str, tuple[np.ndarray, ...]]
    enter: tuple[np.ndarray, ...]
    hold: tuple[np.ndarray, ...]
    weight_bytes: tuple[np.ndarray, ...]
    act_bytes: tuple[np.ndarray, ...]
    xfer_bytes: tuple[np.ndarray, ...]
    chip: ChipLimits
    one_chip: bool  # every assignment fits one chip (then Σ terms is exact)
    unfit: tuple[tuple, ...] = ()  # per layer, the target's choices left out: alone they overflow one chip
    # What a chip's first and last layer cost when a stage starts or ends at them (per run, [layer][choice]):
    # the lead from the frame buffer and its joules (dynamic + static), the body (`core`) and the prefetch
    # that a stage's last layer overlaps with its first; `enter_j` are the joules of `enter`.
    fresh: tuple[np.ndarray, ...] = ()
    fresh_j: tuple[np.ndarray, ...] = ()
    enter_j: tuple[np.ndarray, ...] = ()
    core: tuple[np.ndarray, ...] = ()
    prefetch: tuple[np.ndarray, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    def index(self, assignment: dict) -> list[int]:
        """Choice indices of an assignment {layer: choice}; an int b also names the pair b/b."""
        out = []
        for name, opts in zip(self.names, self.choices, strict=True):
            bits = assignment.get(name)
            if bits not in opts and isinstance(bits, int) and Precision(bits, bits) in opts:
                bits = Precision(bits, bits)
            if bits not in opts:
                raise BitmixError(f"layer {name!r} has no priced choice {bits!r}; valid: {list(opts)}")
            out.append(opts.index(bits))
        return out

    def assignment(self, choice: Sequence[int]) -> dict:
        return {n: opts[j] for n, opts, j in zip(self.names, self.choices, choice, strict=True)}

    def terms(self, resource: str, choice: Sequence[int]) -> float:
        """Σ unary + Σ pairwise of one resource: the single-chip cost."""
        n = len(self.names)
        total = sum(float(u[j]) for u, j in zip(self.unary[resource], choice, strict=True))
        if n > 1:
            total += sum(float(self.pair[resource][i][choice[i], choice[(i + 1) % n]]) for i in range(n))
        return total

    def stages(self, choice: Sequence[int]) -> list[StageSpan]:
        wb = [int(w[j]) for w, j in zip(self.weight_bytes, choice, strict=True)]
        ab = [int(a[j]) for a, j in zip(self.act_bytes, choice, strict=True)]
        return pack_stages(wb, ab, self.chip.sram_bytes, self.chip.program_bytes, self.names)

    def evaluate(self, choice: Sequence[int]) -> Evaluation:
        """The exact per-frame cost, chip partition included (what `simulate()` says)."""
        cycles, energy = self.terms("cycles", choice), self.terms("energy_j", choice)
        sram = int(round(self.terms("sram_bytes", choice)))
        stages = [StageSpan(0, len(self.names), sram, 0)] if self.one_chip else self.stages(choice)
        run_s = cycles * self.frames / self.chip.clock_hz
        if len(stages) == 1:
            return Evaluation(cycles, energy, sram, 1, run_s)
        f, chip = self.chip.clock_hz, self.chip
        period, busy, xfer_total, pcie_j, run_cycles, run_j = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        for st in stages:
            c, j = self._stage_run(st, choice)
            nbytes = int(self.xfer_bytes[st.stop][choice[st.stop]]) if st.stop < len(self.names) else 0
            xfer = chip.transfer_s(nbytes)
            period = max(period, c / f, xfer)
            busy += c / f
            run_cycles += c
            run_j += j
            xfer_total += xfer
            pcie_j += nbytes * chip.pcie_j_per_byte
        idle = (len(stages) * period - busy) * chip.static_power_w
        return Evaluation((run_cycles + xfer_total * f) / self.frames, (run_j + pcie_j + idle) / self.frames, sram,
                          len(stages), period)

    def _stage_run(self, st: StageSpan, choice: Sequence[int]) -> tuple[float, float]:
        """Cycles and joules of one run of a chip's layers: its first reads the frame buffer, its last
        overlaps the prefetch of its first (`simulator.analytic.run` with stages)."""
        j_per_cycle = self.chip.static_power_w / self.chip.clock_hz
        first, last = st.start, st.stop - 1
        cycles = float(self.fresh[first][choice[first]])
        joules = float(self.fresh_j[first][choice[first]])
        for i in range(first + 1, st.stop):
            cycles += float(self.enter[i][choice[i - 1], choice[i]])
            joules += float(self.enter_j[i][choice[i - 1], choice[i]])
        held = sum(float(self.hold[i][choice[i], choice[i + 1]]) for i in range(first, last))
        held += max(float(self.core[last][choice[last]]), float(self.prefetch[first][choice[first]]))
        return cycles + held, joules + held * j_per_cycle

    @classmethod
    def of_terms(cls, names: Sequence[str], choices: Sequence[Sequence[int]],
                 unary: dict[str, Sequence[Sequence[float]]],
                 pair: dict[str, Sequence[Sequence[Sequence[float]]]] | None = None) -> CostModel:
        """A one-chip model from given terms (resources left out cost 0), e.g. a table measured elsewhere.

        `pair[r][i]` is the (k_i x k_{i+1 mod n}) table of edge i; omit `pair` for an additive model.
        """
        n, ks = len(names), [len(c) for c in choices]

        def zeros_pair() -> tuple[np.ndarray, ...]:
            return tuple(np.zeros((ks[i], ks[(i + 1) % n])) for i in range(n))

        un = {r: tuple(np.asarray(u, dtype=float) for u in unary[r]) if r in unary else
              tuple(np.zeros(k) for k in ks) for r in RESOURCES}
        pr = {r: tuple(np.asarray(p, dtype=float) for p in (pair or {})[r]) if r in (pair or {}) else zeros_pair()
              for r in RESOURCES}
        if n == 1:  # a one-layer chain's edge joins the layer to itself: only its diagonal counts
            un = {r: (un[r][0] + np.diag(pr[r][0]),) for r in RESOURCES}
            pr = {r: zeros_pair() for r in RESOURCES}
        sizes = tuple(np.zeros(k, dtype=np.int64) for k in ks)
        limits = ChipLimits(2**62, 0, 0.0, 1.0, 0.0, 0.0, 1.0)
        return cls(tuple(names), tuple(tuple(c) for c in choices), 1, un, pr, zeros_pair(), zeros_pair(), sizes,
                   sizes, sizes, limits, one_chip=True)

    def highest(self) -> list[int]:
        return [0] * len(self.names)

    def lowest(self) -> list[int]:
        return [len(c) - 1 for c in self.choices]
