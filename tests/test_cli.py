import json
import subprocess
import sys

import pytest

from bitmix.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitmix.cli", *args], capture_output=True, text=True, timeout=600)


def test_compile_digits_writes_everything(tmp_path):
    out = tmp_path / "d"
    rc = main(["compile", "digits-cnn", "--target", "int4int2-npu", "--method", "eagl", "--budget", "0.75",
               "--eval", "--finetune-epochs", "1", "--frontier-points", "3", "--out", str(out)])
    assert rc == 0
    d = json.loads((out / "report.json").read_text())
    assert d["model"] == "digits-cnn" and d["target"] == "int4int2-npu" and d["method"] == "eagl"
    assert d["budget"] == 0.75 and len(d["layers"]) == 9
    assert d["accuracy"]["kernels"] == d["accuracy"]["fake_quant"]
    for name in ("report.html", "frontier.png", "bits.png", "energy.png"):
        assert (out / name).exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["capture", "nope"], "unknown model 'nope'"),
        (["compile", "digits-cnn", "--target", "gpu", "--out", "x"], "unknown target 'gpu'"),
        (["compile", "digits-cnn", "--method", "vibes", "--out", "x"], "unknown sensitivity method 'vibes'"),
        (["compile", "digits-cnn", "--budget", "0", "--out", "x"], "budget must be > 0"),
        (["compile", "digits-cnn", "--budget", "0.2", "--out", "x"], "minimum achievable"),
        (["compile", "resnet18", "--eval", "--out", "x"], "no evaluation data"),
        (["simulate", "digits-cnn", "--config", "/nonexistent.toml"], "nonexistent.toml"),
        (["bench", "model", "nope"], "unknown model 'nope'"),
        (["bench", "model", "digits-mlp", "--repeats", "0"], "repeats=0"),
    ],
)
def test_errors_are_one_line_exit_2(args, message):
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("bitmix:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_argparse_errors_exit_2():
    proc = run("compile")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_capture_and_models_print_tables(capsys):
    assert main(["capture", "digits-mlp"]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "total" in out
    assert main(["models", "--no-stats"]) == 0
    assert "resnet50" in capsys.readouterr().out


def test_simulate_json(tmp_path):
    path = tmp_path / "sim.json"
    assert main(["simulate", "digits-cnn", "--bits", "4", "--json", str(path)]) == 0
    d = json.loads(path.read_text())
    assert d["throughput_fps"] > 0 and d["chips"] == 1
