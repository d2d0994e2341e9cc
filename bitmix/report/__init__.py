"""Reports: `Report` (plain data; report.json is the contract) and its renderers, HTML, plots and a terminal table.

Renderers are functions of a Report: `save_report(report, dir)`, `print_report(report)`,
`render_html`, `save_plots`, `layer_table`. Matplotlib and rich load only when one is called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitmix.errors import BitmixError
from bitmix.report.report import LayerRow, Report, load_report, write_json

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["LayerRow", "Report", "layer_table", "load_report", "print_report", "save_report", "write_json"]


def save_report(report: Report, out_dir: str | Path) -> Path:
    """Write report.json, the plots and report.html into `out_dir`; return the HTML path."""
    from bitmix.report.html import render_html
    from bitmix.report.plots import save_plots

    _check_report(report, "save_report")
    if not isinstance(out_dir, str | os.PathLike):
        raise BitmixError(f"save_report needs a folder path (str or Path), got {type(out_dir).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BitmixError(f"cannot write a report into {str(out)!r}: it is a file; give a folder path "
                          "(save_report writes report.json, report.html and the plots there)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(report, out / "report.json")
        plots = save_plots(report, out)
        html = out / "report.html"
        html.write_text(render_html(report, plots, out))
    except OSError as exc:
        raise BitmixError(f"cannot write a report into {str(out)!r} ({exc.strerror or exc}); "
                          "save to a writable folder") from None
    return html


def print_report(report: Report) -> None:
    """The per-layer table, the simulated summary and any warnings on the terminal."""
    from bitmix.report.terminal import print_report as show

    _check_report(report, "print_report")
    show(report)


def layer_table(report: Report) -> Table | Any:
    from bitmix.report.terminal import layer_table as table

    _check_report(report, "layer_table")
    return table(report)


def _check_report(report: object, caller: str) -> None:
    """Renderers read a Report's fields: anything else would fail deep inside with an AttributeError."""
    if not isinstance(report, Report):
        raise BitmixError(f"{caller} needs a bitmix Report (cm.report, or bitmix.load_report(folder)), "
                          f"got {type(report).__name__}")
