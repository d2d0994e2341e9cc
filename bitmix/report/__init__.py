"""Reports: `Report` (plain data; report.json is the contract) and its renderers, HTML, plots and a terminal table.

Renderers are functions of a Report: `save_report(report, dir)`, `print_report(report)`,
`render_html`, `save_plots`, `layer_table`. Matplotlib and rich load only when one is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitmix.report.report import LayerRow, Report, load_report, write_json

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["LayerRow", "Report", "layer_table", "load_report", "print_report", "save_report", "write_json"]


def save_report(report: Report, out_dir: str | Path) -> Path:
    """Write report.json, the plots and report.html into `out_dir`; return the HTML path."""
    from bitmix.report.html import render_html
    from bitmix.report.plots import save_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "report.json")
    plots = save_plots(report, out)
    html = out / "report.html"
    html.write_text(render_html(report, plots, out))
    return html


def print_report(report: Report) -> None:
    """The per-layer table, the simulated summary and any warnings on the terminal."""
    from bitmix.report.terminal import print_report as show

    show(report)


def layer_table(report: Report) -> Table | Any:
    from bitmix.report.terminal import layer_table as table

    return table(report)
