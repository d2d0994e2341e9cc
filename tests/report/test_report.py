import json
import shutil
import subprocess

import pytest

from bitmix.errors import BitmixError
from bitmix.report import LayerRow, Report, layer_table, load_report, print_report, save_report

SIM = {"cycles": 1000.0, "latency_s": 2.5e-6, "throughput_fps": 400000.0, "energy_per_frame_j": 1e-6,
       "power_w": 0.4, "fps_per_w": 1e6, "utilization": 0.5, "chips": 1}


def _report() -> Report:
    rows = (LayerRow("conv", "conv2d", 8, 100, 10, 600.0, 6e-7, None, "compute", True),
            LayerRow("fc", "linear", 2, 50, 5, 400.0, 4e-7, 0.3, "weights", False))
    return Report("toy", "int4int2-npu", "eagl", 0.75, rows, SIM,
                  {"metric": "top1", "fp32": 99.0, "fake_quant": 98.0, "kernels": 98.0}, {"capture": 0.1},
                  frontier=({"fraction": 0.6, "throughput_fps": 5e5, "quality": 97.0, "predicted_drop": 1.0},
                            {"fraction": 1.0, "throughput_fps": 3e5, "quality": 99.0, "predicted_drop": 0.0}),
                  uniform=({"bits": 4, "throughput_fps": 3e5, "quality": 99.0, "predicted_drop": 0.0},),
                  energy_breakdown_j={"mac": 5e-7, "sram": 5e-7})


def test_roundtrip_and_files(tmp_path):
    report = _report()
    html = save_report(report, tmp_path)
    for name in ("report.json", "report.html", "frontier.png", "bits.png", "energy.png"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert {"model", "target", "method", "budget", "layers", "simulated", "accuracy", "timings_s"} <= data.keys()
    assert set(data["layers"][0]) >= {"name", "kind", "bits", "macs", "params", "cycles", "energy_j", "score"}
    assert load_report(tmp_path) == report
    text = html.read_text()
    assert "data:image/png;base64" in text and "<script" not in text and "400,000" in text


def test_load_report_errors(tmp_path):
    with pytest.raises(BitmixError, match="no report"):
        load_report(tmp_path / "missing")
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(BitmixError, match="not valid JSON"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(BitmixError, match="missing key"):
        load_report(tmp_path)
    good = _report().to_dict()
    for layers in (5, [1], [{**good["layers"][0], "extra": 1}], [{"name": "conv"}]):
        (tmp_path / "report.json").write_text(json.dumps({**good, "layers": layers}))
        with pytest.raises(BitmixError, match="not a bitmix report: .*; write reports with bitmix.save_report"):
            load_report(tmp_path)


def test_non_finite_numbers_are_null_in_strict_json_and_a_missing_metric_is_no_none(tmp_path):
    """pareto-greedy proves no optimality gap (inf): report.json said `Infinity`, which JSON does not have; a
    compile without eval data has metric None, which the page printed as "None FP32"."""
    import dataclasses

    report = dataclasses.replace(_report(), info={"optimality_gap": float("inf"), "solver": "pareto-greedy"},
                                 accuracy={"metric": None, "fp32": None, "fake_quant": None, "kernels": None})
    save_report(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["info"]["optimality_gap"] is None
    assert "None FP32" not in (tmp_path / "report.html").read_text()


def test_save_and_print_refuse_bad_arguments_in_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(BitmixError, match="it is a file; give a folder path"):
        save_report(_report(), a_file)
    with pytest.raises(BitmixError, match="cannot write a report into .*a_file/out.*; save to a writable folder"):
        save_report(_report(), a_file / "out")
    with pytest.raises(BitmixError, match="save_report needs a folder path"):
        save_report(_report(), None)
    for render in (print_report, layer_table):
        with pytest.raises(BitmixError, match=f"{render.__name__} needs a bitmix Report .*got NoneType"):
            render(None)
    with pytest.raises(BitmixError, match="save_report needs a bitmix Report .*got dict"):
        save_report({}, tmp_path)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make setup installs it where apt-get works)")
def test_html_renders_in_headless_chromium(tmp_path):
    import numpy as np
    from matplotlib.image import imread

    html = save_report(_report(), tmp_path)
    png = tmp_path / "shot.png"
    log = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1200,1600", f"--screenshot={png}", html.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert png.exists(), log.stderr[-2000:]
    assert "Uncaught" not in log.stderr and "console(" not in log.stderr.replace("console(0)", "")
    pixels = imread(png)[..., :3]
    assert pixels.std() > 0.05  # not a blank page
    assert (np.abs(pixels - pixels[0, 0]).sum(-1) > 0.1).mean() > 0.02


def test_renderers_are_functions_of_plain_data(capsys):
    import sys

    report = _report()
    assert layer_table(report).row_count == len(report.layers)
    print_report(report)
    out = capsys.readouterr().out
    assert "toy" in out and "400,000 frames/s" in out and "fc" in out
    code = ("import sys, bitmix.report.report; "
            "print(sorted(m for m in sys.modules if m.startswith('bitmix.report.') or m == 'matplotlib'))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['bitmix.report.report']"  # the data type pulls in no renderer


def test_pairs_show_weight_and_activation_bits(tmp_path):
    from bitmix.ir.precision import Precision

    rows = (LayerRow("fc", "linear", Precision(4, 8), 50, 5, 400.0, 4e-7, 0.3, "compute", False),
            LayerRow("old", "linear", 2, 50, 5, 400.0, 4e-7, 0.3, "compute", False))
    report = Report("toy", "w4a8-npu", "sqnr", 1.0, rows, SIM, {}, {})
    save_report(report, tmp_path)
    layers = json.loads((tmp_path / "report.json").read_text())["layers"]
    assert [(r["bits"], r["a_bits"]) for r in layers] == [(4, 8), (2, 2)]
    old = json.loads((tmp_path / "report.json").read_text())
    for row in old["layers"]:
        del row["a_bits"]  # a report written before pairs: plain bits read as b/b
    (tmp_path / "report.json").write_text(json.dumps(old))
    assert [r.precision for r in load_report(tmp_path).layers] == ["4/4", "2/2"]
    assert "4/8" in (tmp_path / "report.html").read_text()
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(layer_table(report))
    assert "4/8" in console.export_text()


def test_titles_show_the_budget_rounded_or_its_goals():
    from dataclasses import replace

    from bitmix.report.html import render_html

    clamped = replace(_report(), budget=0.9865319865319865)
    assert clamped.budget_text == "0.9865" and "budget 0.9865)" in str(layer_table(clamped).title)
    assert "budget 0.9865;" in render_html(clamped, {})
    goals = replace(_report(), budget={"fps": 1234567.0, "energy_j": 2.5e-6})
    assert goals.budget_text == "fps 1.235e+06, energy_j 2.5e-06"


def test_fidelity_says_what_it_was_measured_on_in_terminal_and_html(tmp_path):
    """The cosine comes from the calibration inputs, which also set the ranges: it was labelled "on the example
    inputs", and the page, the only view of a compile without evaluation data, did not show it at all."""
    import dataclasses

    from bitmix.report.html import render_html
    from bitmix.report.terminal import summary_lines

    fid = {"example_cosine": 0.99912, "example_max_rel_err": 0.0767, "fidelity_inputs": "calibration",
           "fidelity_examples": 32, "fidelity_in_sample": True}
    report = dataclasses.replace(_report(), accuracy={"metric": None, "fp32": None, "fake_quant": None,
                                                      "kernels": None} | fid)
    line = ("fidelity to FP32 on the 32 calibration inputs (in-sample: they set the activation ranges): "
            "cosine 0.9991, max relative error 0.0767")
    assert line in summary_lines(report)
    page = render_html(report, {})
    assert line in page and ">0.9991</div><div class=\"k\">cosine to FP32<" in page
    held_out = dataclasses.replace(report, accuracy=report.accuracy | {"fidelity_inputs": "example",
                                                                      "fidelity_examples": 4,
                                                                      "fidelity_in_sample": False})
    assert "fidelity to FP32 on the 4 example inputs: cosine" in summary_lines(held_out)[1]
    save_report(report, tmp_path)
    assert load_report(tmp_path).accuracy == report.accuracy
