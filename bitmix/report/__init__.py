"""Reports: JSON (the contract), HTML, plots and a terminal table."""

from bitmix.report.report import LayerRow, Report, load_report

__all__ = ["LayerRow", "Report", "load_report"]
