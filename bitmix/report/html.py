"""report.html: a self-contained page (plots inlined as base64, no scripts) a person reads in a browser."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING

from bitmix.report.report import fidelity_line

if TYPE_CHECKING:
    from bitmix.report.report import Report

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#222;background:#fafafa}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1.2rem 0}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:.7rem 1rem;min-width:9rem}
.card .v{font-size:1.35rem;font-weight:600} .card .k{color:#666;font-size:.8rem}
table{border-collapse:collapse;background:#fff;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right} th{background:#f0f0f0}
td.l{text-align:left} tr.fp32 td{color:#a33} .warn{background:#fff3cd;border:1px solid #e0c36a;padding:.6rem;
border-radius:6px} figure{margin:1.2rem 0} img{max-width:100%;border:1px solid #ddd;background:#fff}
"""


def _card(key: str, value: str) -> str:
    return f'<div class="card"><div class="v">{html.escape(value)}</div><div class="k">{html.escape(key)}</div></div>'


def _fmt(v: object, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def render_html(report: Report, plots: dict[str, str], base: Path | None = None) -> str:
    s, acc = report.simulated, report.accuracy
    cards = [
        _card(f"{acc.get('metric') or 'quality'} FP32", _fmt(acc.get("fp32"), ".2f")),
        _card("fake-quant", _fmt(acc.get("fake_quant"), ".2f")),
        _card("on kernels", _fmt(acc.get("kernels"), ".2f")),
        _card("cosine to FP32", _fmt(acc.get("example_cosine"), ".4f")),
        _card("simulated frames/s", f"{s['throughput_fps']:,.0f}"),
        _card(f"latency ({s.get('frames', 1)}-frame run)", f"{s['latency_s'] * 1e6:,.1f} µs"),
        _card("energy / frame", f"{s['energy_per_frame_j'] * 1e6:,.2f} µJ"),
        _card("power", f"{s['power_w']:.2f} W"),
        _card("FPS/W", f"{s['fps_per_w']:,.0f}"),
        _card("utilization", f"{s['utilization']:.1%}"),
        _card("chips", str(s["chips"])),
    ]
    rows = []
    for i, r in enumerate(report.layers):
        bits = "fp32 (no kernel)" if r.bits is None else f"{r.precision}{' (pinned)' if r.pinned else ''}"
        rows.append(
            f'<tr class="{"fp32" if r.bits is None else ""}"><td>{i}</td><td class="l">{html.escape(r.name)}</td>'
            f'<td class="l">{r.kind}</td><td>{bits}</td><td>{r.macs:,}</td><td>{r.params:,}</td>'
            f"<td>{r.cycles:,.0f}</td><td>{r.energy_j * 1e6:.3f}</td><td>{_fmt(r.score, '.4g')}</td>"
            f'<td class="l">{html.escape(r.bound)}</td></tr>'
        )
    warnings = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in report.warnings)
    fidelity = fidelity_line(acc)  # the only quality number of a compile without evaluation data
    fidelity_p = f'<p class="sub">{html.escape(fidelity)}</p>' if fidelity else ""
    figures = []
    for title, name in plots.items():
        png = (base or Path(".")) / name
        figures.append(f"<figure><figcaption>{html.escape(title)}</figcaption>{_img(png, name, title)}</figure>")
    timings = ", ".join(f"{html.escape(k)} {v:.2f} s" for k, v in report.timings_s.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bitmix report: {html.escape(report.model)}</title>
<style>{CSS}</style></head><body>
<h1>bitmix: {html.escape(report.model)} → {html.escape(report.target)}</h1>
<p class="sub">method {html.escape(report.method)}, budget {html.escape(report.budget_text)};
stage timings: {timings}</p>
{warnings}
<div class="cards">{''.join(cards)}</div>
{fidelity_p}
{''.join(figures)}
<h2>Layers</h2>
<table><thead><tr><th>#</th><th>layer</th><th>kind</th><th>w/a bits</th><th>MACs</th><th>params</th><th>cycles</th>
<th>energy µJ</th><th>score</th><th>bound</th></tr></thead><tbody>
{''.join(rows)}
</tbody></table>
</body></html>
"""


def _img(png: Path, name: str, title: str) -> str:
    if png.exists():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
    return f'<img alt="{html.escape(title)}" src="{html.escape(name)}">'
