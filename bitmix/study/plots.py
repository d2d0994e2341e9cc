"""The study's figures: quality vs simulated throughput per method, and the additivity scatter."""

from __future__ import annotations

from pathlib import Path

from bitmix.study.config import PROPOSED


def plot_frontier(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, rows in result["frontier"].items():
        good = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["fps_mean"])
        if not good:
            continue
        x = [r["fps_mean"] for r in good]
        y = [r["quality_mean"] for r in good]
        s = [r["quality_std"] for r in good]
        (line,) = ax.plot(x, y, marker="o", ms=4, lw=1.6 if method in PROPOSED else 1.0, label=method)
        ax.fill_between(x, [a - b for a, b in zip(y, s, strict=True)], [a + b for a, b in zip(y, s, strict=True)],
                        color=line.get_color(), alpha=0.15, lw=0)
    for name, ref in result["references"].items():
        ax.errorbar(ref["fps_mean"], ref["quality_mean"], yerr=ref["quality_std"], fmt="s", color="black", ms=6,
                    capsize=3, zorder=5)
        ax.annotate(name, (ref["fps_mean"], ref["quality_mean"]), textcoords="offset points", xytext=(6, -12),
                    fontsize=8)
    ax.axhline(result["fp32"], color="grey", ls="--", lw=0.8, label="FP32")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v / 1e6:g} M"))
    ax.set_xlabel(f"simulated throughput (frames/s, NorthPole-style {result.get('target', 'int4int2-npu')})")
    ax.set_ylabel(f"quality on packed kernels ({result['metric']}, %)")
    ax.set_title(f"{result['model']}: quality vs simulated throughput (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_additivity(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    add = result["additivity"]
    sets = add["sets"]
    methods = list(next(iter(sets.values()))["methods"])
    fig, axes = plt.subplots(len(sets), len(methods), figsize=(3.3 * len(methods), 3.1 * len(sets)), squeeze=False)
    for row, (name, entry) in zip(axes, sets.items(), strict=True):
        for ax, method in zip(row, methods, strict=True):
            e = entry["methods"][method]
            ax.scatter(e["predicted"], entry["measured"], c=entry["lowered_layers"], cmap="viridis", s=18)
            rho = "n/a" if e["rho"] is None else f"{e['rho']:.2f}"
            ax.set_title(f"{method} ({name}): Spearman ρ = {rho}", fontsize=9)
            ax.set_xlabel(f"predicted drop (Σ {method} scores)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("measured test-loss increase", fontsize=8)
    fig.suptitle(f"{result['model']}: additivity, {add['n']} random 2-bit subsets per row "
                 "(spread: 1..all layers lowered; fixed: half of them; colour = layers at 2 bits)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
