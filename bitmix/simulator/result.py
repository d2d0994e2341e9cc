"""Results: what an engine reports per layer, and the network-level `SimResult`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bitmix.ir.precision import Precision
from bitmix.simulator.energy import ActionCounts
from bitmix.simulator.mapping import Mapping


@dataclass(frozen=True)
class LayerEval:
    """One engine's verdict on one layer at one precision (per run of the layer's batch)."""

    name: str
    bits: Precision
    cycles: float
    stages: dict[str, float]  # busy cycles of each resource on the critical core
    counts: ActionCounts
    mapping: Mapping

    @property
    def bound(self) -> str:
        """The resource with the most busy cycles: what limits the layer."""
        return max(self.stages, key=self.stages.__getitem__)


@dataclass(frozen=True)
class LayerResult:
    name: str
    kind: str
    bits: Precision
    macs: int
    params: int
    chip: int
    cycles: float
    latency_s: float
    energy_j: float  # per frame
    energy_breakdown_j: dict[str, float]  # per frame
    stage_cycles: dict[str, float]
    bound: str
    utilization: float
    mapping: str
    cores_used: int
    weight_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: `bits` is the weight width, `a_bits` the activation width and `rotated` whether the choice
        asked for the input rotation ("4/8r"), as in report.json."""
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}
        out["bits"], out["a_bits"], out["rotated"] = self.bits.w, self.bits.a, self.bits.rotated
        return out


@dataclass(frozen=True)
class StageResult:
    """One chip of a multi-chip pipeline."""

    chip: int
    first_layer: str
    last_layer: str
    layers: int
    weight_bytes: int
    capacity_bytes: int
    latency_s: float  # compute time of this chip's layers per run
    transfer_bytes: int  # activations sent over PCIe to the next chip (0 for the last)
    transfer_s: float
    transfer_energy_j: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SimResult:
    """Simulated cost of a whole network at an assignment of precisions."""

    model: str
    engine: str
    chip_name: str
    frames: int
    layers: tuple[LayerResult, ...]
    stages: tuple[StageResult, ...]
    cycles: float  # latency of one run (all frames of the batch), in cycles of the chip clock
    latency_s: float
    throughput_fps: float
    energy_per_frame_j: float
    energy_breakdown_j: dict[str, float]  # per frame
    power_w: float
    fps_per_w: float
    utilization: float
    chips: int
    pipeline_period_s: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (report.json's `simulated` uses the scalar keys)."""
        return {
            "model": self.model,
            "engine": self.engine,
            "chip": self.chip_name,
            "frames": self.frames,
            "cycles": self.cycles,
            "latency_s": self.latency_s,
            "throughput_fps": self.throughput_fps,
            "energy_per_frame_j": self.energy_per_frame_j,
            "energy_breakdown_j": dict(self.energy_breakdown_j),
            "power_w": self.power_w,
            "fps_per_w": self.fps_per_w,
            "utilization": self.utilization,
            "chips": self.chips,
            "pipeline_period_s": self.pipeline_period_s,
            "stages": [s.to_dict() for s in self.stages],
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def table(self, max_layers: int = 60) -> Any:
        """A rich Table: per-layer rows, then totals."""
        from rich.table import Table

        t = Table(title=f"{self.model} on {self.chips}x {self.chip_name} ({self.engine} engine)")
        for col in ("layer", "bits", "chip", "MMAC", "cycles", "us", "uJ/frame", "util", "bound", "map"):
            t.add_column(col, justify="left" if col in ("layer", "bound", "map") else "right")
        rows = self.layers if len(self.layers) <= max_layers else self.layers[:max_layers]
        for r in rows:
            t.add_row(r.name, str(r.bits), str(r.chip), f"{r.macs / 1e6:.1f}", f"{r.cycles:,.0f}",
                      f"{r.latency_s * 1e6:.2f}", f"{r.energy_j * 1e6:.2f}", f"{r.utilization:.0%}", r.bound,
                      r.mapping)
        if len(self.layers) > max_layers:
            t.add_row(f"... {len(self.layers) - max_layers} more", *[""] * 9)
        t.add_section()
        t.add_row("total", "", str(self.chips), f"{sum(r.macs for r in self.layers) / 1e6:.1f}",
                  f"{self.cycles:,.0f}", f"{self.latency_s * 1e6:.2f}", f"{self.energy_per_frame_j * 1e6:.2f}",
                  f"{self.utilization:.0%}", "", "")
        return t

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v * 1e6:.1f}" for k, v in self.energy_breakdown_j.items() if v > 0)
        return (f"{self.model}: {self.throughput_fps:,.0f} frames/s, latency {self.latency_s * 1e6:,.1f} us, "
                f"{self.energy_per_frame_j * 1e3:.3f} mJ/frame ({parts} uJ), {self.power_w:.1f} W, "
                f"{self.fps_per_w:,.0f} FPS/W, utilization {self.utilization:.0%}, {self.chips} chip(s)")

    def print(self) -> None:
        from rich.console import Console

        console = Console()
        console.print(self.table())
        console.print(self.summary())
        if self.chips > 1:
            for s in self.stages:
                console.print(f"  chip {s.chip}: {s.layers} layers {s.first_layer} .. {s.last_layer}, "
                              f"{s.weight_bytes / 2**20:.1f}/{s.capacity_bytes / 2**20:.1f} MiB, "
                              f"{s.latency_s * 1e6:.1f} us, PCIe {s.transfer_bytes / 1024:.1f} KiB "
                              f"in {s.transfer_s * 1e6:.2f} us")
