"""Plots (matplotlib, Agg): accuracy-throughput frontier, per-layer bits with sensitivity, energy breakdown."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from bitmix.report.report import Report


def save_plots(report: Report, out: Path) -> dict[str, str]:
    """Write the PNGs; return {title: file name} for the HTML page."""
    plots = {}
    if report.frontier:
        plots["Accuracy–throughput frontier"] = _frontier(report, out / "frontier.png")
    plots["Per-layer precision and sensitivity"] = _bits(report, out / "bits.png")
    if report.energy_breakdown_j:
        plots["Energy per frame by component"] = _energy(report, out / "energy.png")
    return plots


def _frontier(report: Report, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    measured = all(p.get("quality") is not None for p in report.frontier)
    metric = report.accuracy.get("metric") or "quality"
    key, label = ("quality", f"{metric} %, post-training (no fine-tune)") if measured else (
        "predicted_drop", "predicted quality drop (Σ scores)")
    pts = sorted(report.frontier, key=lambda p: p["throughput_fps"])
    ax.plot([p["throughput_fps"] for p in pts], [p[key] for p in pts], "o-", label=f"{report.method} knapsack")
    for u in report.uniform:
        if u.get(key) is not None:
            ax.scatter([u["throughput_fps"]], [u[key]], marker="s", s=60, zorder=3)
            ax.annotate(f"all {u['bits']}", (u["throughput_fps"], u[key]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
    chosen = report.simulated["throughput_fps"]
    ax.axvline(chosen, color="gray", ls="--", lw=1, label="compiled")
    if measured and report.accuracy.get("kernels") is not None:
        ax.scatter([chosen], [report.accuracy["kernels"]], marker="*", s=120, color="k", zorder=4,
                   label="compiled, on kernels (after QAT if any)")
    ax.set_xlabel("simulated throughput (frames/s)")
    ax.set_ylabel(label)
    ax.set_title(f"{report.model} on {report.target}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _bits(report: Report, path: Path) -> str:
    rows = report.layers
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows) + 2), 4), dpi=110)
    x = range(len(rows))
    ax.bar(x, [r.bits or 32 for r in rows], color=["#888" if r.pinned else "#3b7dd8" for r in rows],
           label="weight bits")
    ax.plot(list(x), [r.a_bits or 32 for r in rows], "_", color="k", ms=10, mew=2, label="activation bits")
    ax.set_ylabel("bits (bar: weights, tick: activations; grey: pinned)")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=6)
    scores = [r.score for r in rows]
    if any(s is not None for s in scores):
        ax2 = ax.twinx()
        ax2.plot(list(x), [s if s is not None else float("nan") for s in scores], "o", color="#d84b3b", ms=3)
        ax2.set_ylabel("sensitivity score at lowest choice", color="#d84b3b")
    ax.set_title("Per-layer precision")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _energy(report: Report, path: Path) -> str:
    items = sorted(((k, v) for k, v in report.energy_breakdown_j.items() if v > 0), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.barh([k for k, _ in items], [v * 1e6 for _, v in items], color="#4caf50")
    ax.invert_yaxis()
    ax.set_xlabel("µJ per frame")
    ax.set_title("Simulated energy breakdown")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name
