"""Public entry: `simulate` a captured graph (or `simulate_calls` on bare Layer records).

Throughput: one chip runs layers one after another over the whole core array, so it
finishes a run (all frames of the batch) every `latency`; frames do not overlap on a
chip. With several chips the stages form a pipeline: each chip works on a different
run, and the slowest stage (its compute or its PCIe hand-off, which DMA overlaps with
compute) sets the period. Static power is drawn by every chip all the time.
"""

from __future__ import annotations

from collections.abc import Sequence

from bitmix.errors import BitmixError
from bitmix.ir.graph import Layer, LayerGraph, VectorOp
from bitmix.ir.precision import Precision, PrecisionLike, as_precision, chip_precision
from bitmix.simulator import analytic, engine
from bitmix.simulator.config import ChipConfig
from bitmix.simulator.energy import COMPONENTS, dynamic_energy, pcie_energy, static_energy
from bitmix.simulator.mapping import layer_works, weight_bytes
from bitmix.simulator.multichip import partition, transfer_bytes, transfer_seconds
from bitmix.simulator.result import LayerResult, SimResult, StageResult

ENGINES = {"analytic": analytic.run, "cycle": engine.run}


def simulate(graph: LayerGraph, assignment: dict[str, PrecisionLike], config: ChipConfig | None = None,
             engine: str = "analytic") -> SimResult:
    """Simulate `graph` with `assignment[layer]` a `Precision` pair (an int b means b/b) on one or more chips."""
    return simulate_calls(graph.layers, assignment, graph.vector_ops, config, engine, graph.model_name, graph.frames)


def simulate_calls(layers: Sequence[Layer], assignment: dict[str, PrecisionLike], vector_ops: Sequence[VectorOp] = (),
                   config: ChipConfig | None = None, engine: str = "analytic", model: str = "model",
                   frames: int | None = None) -> SimResult:
    """Simulate Layer/VectorOp records as executed (e.g. shapes recorded at run time).

    `frames`: frames per run (the inputs' batch, `bitmix.ir.graph.frames_of`); None reads the first layer's
    dim 0, which is right only where that layer runs batch-first.
    """
    chip = config or ChipConfig()
    if engine not in ENGINES:
        raise BitmixError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    works = layer_works(list(layers), list(vector_ops))
    missing = [w.layer.name for w in works if w.layer.name not in assignment]
    if missing:
        raise BitmixError(f"assignment has no precision for layer {missing[0]!r}; give every layer 8, 4 or 2")
    assignment = {name: chip_precision(bits, f"assignment[{name!r}] =") for name, bits in assignment.items()}
    stages = partition(works, assignment, chip)
    evals = ENGINES[engine](works, assignment, chip, [(st.start, st.stop) for st in stages])
    frames = frames or works[0].gemm.frames
    f = chip.clock_hz

    layer_results = []
    breakdown = dict.fromkeys(COMPONENTS, 0.0)
    stage_results = []
    period = 0.0
    latency = 0.0
    ideal = 0.0
    for idx, st in enumerate(stages):
        seconds = 0.0
        for w, ev in zip(works[st.start:st.stop], evals[st.start:st.stop], strict=True):
            dyn = dynamic_energy(ev.counts, ev.bits, chip.energy)
            t = ev.cycles / f
            parts = {**{k: v / frames for k, v in dyn.items()}, "static": static_energy(t, chip.energy) / frames}
            for k, v in parts.items():
                breakdown[k] += v
            peak = chip.cores * chip.macs_per_cycle(ev.bits.compute)
            ideal += w.gemm.macs / peak
            layer_results.append(LayerResult(
                name=w.layer.name, kind=w.layer.kind, bits=ev.bits, macs=w.layer.macs, params=w.layer.params,
                chip=idx, cycles=ev.cycles, latency_s=t, energy_j=sum(parts.values()), energy_breakdown_j=parts,
                stage_cycles=dict(ev.stages), bound=ev.bound, utilization=w.gemm.macs / (peak * ev.cycles),
                mapping=ev.mapping.describe(), cores_used=ev.mapping.cores_used,
                weight_bytes=weight_bytes(w.layer, ev.bits),
            ))
            seconds += t
        nbytes = transfer_bytes(works, assignment, st)
        xfer = transfer_seconds(nbytes, chip)
        e_xfer = pcie_energy(nbytes, chip.energy)
        breakdown["pcie"] += e_xfer / frames
        stage_results.append(StageResult(idx, works[st.start].layer.name, works[st.stop - 1].layer.name,
                                         st.stop - st.start, st.weight_bytes, st.capacity_bytes, seconds, nbytes,
                                         xfer, e_xfer))
        period = max(period, seconds, xfer)
        latency += seconds + xfer
    # Every chip draws static power for the whole period, busy or waiting on the slowest stage.
    busy = sum(s.latency_s for s in stage_results)
    breakdown["static"] += static_energy(len(stages) * period - busy, chip.energy) / frames
    energy = sum(breakdown.values())
    fps = frames / period
    return SimResult(
        model=model, engine=engine, chip_name=chip.name, frames=frames, layers=tuple(layer_results),
        stages=tuple(stage_results), cycles=latency * f, latency_s=latency, throughput_fps=fps,
        energy_per_frame_j=energy, energy_breakdown_j=breakdown, power_w=energy * fps, fps_per_w=1.0 / energy,
        utilization=ideal / (busy * f), chips=len(stages), pipeline_period_s=period,
    )


def uniform(graph: LayerGraph | Sequence[Layer], bits: PrecisionLike) -> dict[str, Precision]:
    """An assignment giving every layer the same precision."""
    layers = graph.layers if isinstance(graph, LayerGraph) else graph
    p = as_precision(bits)
    return {layer.name: p for layer in layers}
