"""Terminal rendering: a summary line and the per-layer rich table."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from bitmix.report.report import fidelity_line

if TYPE_CHECKING:
    from bitmix.report.report import Report


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 160)


def layer_table(report: Report) -> Table:
    table = Table(title=f"{report.model} → {report.target} ({report.method}, budget {report.budget_text})")
    for col in ("#", "layer", "kind", "w/a bits", "MACs", "params", "cycles", "energy µJ", "score", "bound"):
        table.add_column(col, justify="left" if col in ("layer", "kind", "bound") else "right",
                         overflow="fold" if col == "layer" else "ellipsis")
    for i, row in enumerate(report.layers):
        bits = f"{row.precision}{'*' if row.pinned else ''}"
        score = "" if row.score is None else f"{row.score:.4g}"
        table.add_row(str(i), row.name, row.kind, bits, f"{row.macs:,}", f"{row.params:,}", f"{row.cycles:,.0f}",
                      f"{row.energy_j * 1e6:.3f}", score, row.bound)
    return table


def summary_lines(report: Report) -> list[str]:
    s = report.simulated
    lines = [
        f"simulated: {s['throughput_fps']:,.0f} frames/s, latency {s['latency_s'] * 1e6:,.1f} µs "
        f"per {s.get('frames', 1)}-frame run, "
        f"{s['energy_per_frame_j'] * 1e6:,.2f} µJ/frame, {s['power_w']:.2f} W, {s['fps_per_w']:,.0f} FPS/W, "
        f"utilization {s['utilization']:.1%}, {s['chips']} chip(s)"
    ]
    acc = report.accuracy
    if acc.get("fp32") is not None:
        parts = [f"{k} {acc[k]:.2f}" for k in ("fp32", "fake_quant", "kernels") if acc.get(k) is not None]
        lines.append(f"quality ({acc.get('metric')}): " + ", ".join(parts))
    fidelity = fidelity_line(acc)
    if fidelity is not None:
        lines.append(fidelity)
    lines.append("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings_s.items()))
    return lines


def print_report(report: Report) -> None:
    console = _console()
    console.print(layer_table(report))
    console.print("* pinned by the target")
    for line in summary_lines(report):
        console.print(line)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
