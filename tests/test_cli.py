import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        (["simulate", "digits-cnn", "--bits", "8/4"], "weights wider than activations"),
        (["simulate", "digits-cnn", "--bits", "3"], "--bits '3'"),
        (["simulate", "digits-mlp", "--bits", "4/4r"], "'r' (rotated input) applies to 8-bit activations only"),
        (["bench", "model", "nope"], "unknown model 'nope'"),
        (["bench", "model", "digits-mlp", "--repeats", "0"], "repeats=0"),
        (["bench", "model", "digits-mlp", "--target", "gpu"], "unknown target 'gpu'"),
        (["compile", "digits-cnn", "--out", "/proc/bitmix-out"], "--out '/proc/bitmix-out': cannot write there"),
        (["compile", "digits-cnn", "--out", "/etc/hostname"], "is a file; give a directory"),
        (["simulate", "digits-cnn", "--json", "/proc/none/sim.json"], "--json '/proc/none/sim.json': cannot write"),
        (["study", "frontier", "digits-mlp", "--out", "/tmp", "--results", "/proc/r.md"], "--results '/proc/r.md'"),
        (["compile", "digits-mlp", "--budget", "0.5", "--fps", "1e6", "--out", "x"], "--budget or absolute goals"),
        (["compile", "digits-mlp", "--frontier-points", "-3", "--out", "x"], "frontier_points must be an int >= 0"),
        (["compile", "digits-mlp", "--finetune-epochs", "0", "--fps", "1e15", "--out", "x"], "fps is infeasible"),
        (["compile", "digits-mlp", "--finetune-epochs", "0", "--latency", "1e-12", "--out", "x"],
         "s per run is infeasible"),
        (["compile", "digits-mlp", "--finetune-epochs", "0", "--energy", "1e-15", "--out", "x"],
         "an energy of 1e-15 J per frame is infeasible"),
        (["compile", "digits-mlp", "--ray-address", "", "--out", "x"], "--ray-address is empty"),
        (["study", "frontier", "digits-mlp", "--workers", "0", "--out", "/tmp/bitmix-w0"], "--workers must be >= 1"),
        (["simulate", "digits-cnn", "--config", str(Path(__file__).parent / "test_cli.py")], "not valid TOML"),
        # an empty path is refused, not taken as no path or as the current directory; a later bad argument
        # (--method vibes, --workers 0, model nope) keeps the code before the fix from running the whole command
        (["simulate", "digits-cnn", "--json", ""], "--json is empty; give a file path, or drop --json"),
        (["compile", "digits-cnn", "--out", "", "--method", "vibes"], "--out is empty; give a directory"),
        (["compile", "digits-cnn", "--config", "", "--method", "vibes", "--out", "x"], "--config is empty"),
        (["compile", "digits-cnn", "--data", "", "--method", "vibes", "--out", "x"], "--data is empty"),
        (["bench", "model", "nope", "--json", ""], "--json is empty"),
        (["study", "frontier", "digits-mlp", "--out", "", "--workers", "0"], "--out is empty"),
        (["study", "frontier", "digits-mlp", "--results", "", "--workers", "0", "--out", "/tmp/bitmix-w0"],
         "--results is empty"),
        (["study", "frontier", "digits-mlp", "--seeds", "0", "--quick", "--workers", "0", "--out", "/tmp/bitmix-w0"],
         "--seeds must be >= 1, got 0"),
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
    assert main(["simulate", "digits-cnn", "--bits", "4/8", "--json", str(path)]) == 0
    layers = json.loads(path.read_text())["layers"]
    assert all((row["bits"], row["a_bits"]) == (4, 8) for row in layers)
    assert main(["simulate", "digits-mlp", "--bits", "4/8r", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["layers"]
    assert all((row["bits"], row["a_bits"], row["rotated"]) == (4, 8, True) for row in rows)


class TinyConvNet(torch.nn.Module):
    """Two quantizable layers (a conv and a linear) around a ReLU and a pooling vector op."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _export(path, dynamic: bool = False) -> str:
    torch.manual_seed(0)
    dims = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(TinyConvNet().eval(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=dims)
    torch.export.save(program, path)
    return str(path)


def test_compile_exported_program_without_warnings(tmp_path):
    """`python -m bitmix compile model.pt2`: report written, nothing printed on stderr (no torch FutureWarning)."""
    model, out = _export(tmp_path / "tiny.pt2"), tmp_path / "d"
    torch.save(torch.randn(16, 3, 8, 8), tmp_path / "calib.pt")
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "bitmix", "compile", model, "--target", "int8-npu",
                           "--budget", "1.0", "--data", str(tmp_path / "calib.pt"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    d = json.loads((out / "report.json").read_text())
    assert d["model"] == "tiny" and d["target"] == "int8-npu"
    assert [(r["name"], r["kind"], r["bits"]) for r in d["layers"]] == [("conv", "conv2d", 8), ("fc", "linear", 8)]


def test_exported_program_inputs_shapes_and_data(tmp_path, capsys):
    model = _export(tmp_path / "dyn.pt2", dynamic=True)
    assert main(["capture", model, "--input-shape", "5x3x8x8"]) == 0
    assert "5×3×8×8" in capsys.readouterr().out  # the layers were captured at the shape asked for
    calib = tmp_path / "calib.pt"
    torch.save(torch.rand(64, 3, 8, 8), calib)
    out = str(tmp_path / "d")
    sqnr = ["compile", model, "--method", "sqnr", "--target", "mixed-npu", "--budget", "1", "--out", out]
    assert main(sqnr) == 2  # a post-training method: it scores layers on calibration inputs, which --data gives
    assert "needs unlabeled calibration inputs" in capsys.readouterr().err
    assert main([*sqnr, "--data", str(calib)]) == 0
    assert json.loads((tmp_path / "d" / "report.json").read_text())["method"] == "sqnr"


@pytest.mark.parametrize(
    "make,args,message",
    [
        (lambda p: p.write_text("not a program"), [], "is not a torch.export program"),
        (lambda p: torch.save(torch.nn.Linear(2, 2), p), [], "is not a torch.export program"),
        (lambda p: None, [], "no such file"),
        (lambda p: _export(p), ["--input-shape", "4x3x8x8"], "does not accept --input-shape 4x3x8x8"),
        (lambda p: _export(p), ["--input-shape", "2x3x8x8", "--input-shape", "1x3"], "takes 1 input(s)"),
        (lambda p: _export(p), ["--data", "/nonexistent.pt"], "no such file '/nonexistent.pt' for --data"),
        (lambda p: _export(p, dynamic=True), ["--input-shape", "99999999999x3x8x8"],
         "input 0 of shape 99999999999x3x8x8 needs 19,199,999,999,808 float32 values (76.8 TB)"),
    ],
)
def test_bad_programs_are_one_line_exit_2(tmp_path, capfd, make, args, message):
    path = tmp_path / "model.pt2"
    make(path)
    assert main(["compile", str(path), "--out", str(tmp_path / "d"), *args]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bitmix: error:") and message in err, err


def test_a_model_bitmix_saved_is_named_as_such(tmp_path, capfd):
    import bitmix

    cm = bitmix.compile(TinyConvNet().eval(), (torch.randn(2, 3, 8, 8),), "int8-npu",
                        options=bitmix.CompileOptions(frontier_points=0))
    path = str(cm.save(tmp_path / "compiled.pt2"))
    capfd.readouterr()
    for args in (["capture", path], ["compile", path, "--out", str(tmp_path / "d")]):
        assert main(args) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a model bitmix already compiled" in err and "bitmix.load" in err, err


def test_bad_calibration_file(tmp_path, capfd):
    model, calib = _export(tmp_path / "m.pt2"), tmp_path / "c.pt"
    torch.save(torch.rand(16, 3, 9, 9), calib)
    assert main(["compile", model, "--data", str(calib), "--out", str(tmp_path / "d")]) == 2
    assert "only the batch (first) dimension may differ" in capfd.readouterr().err


class BakedBatch(torch.nn.Module):
    """`x.view(x.shape[0], -1)` exported with a static batch becomes `view(x, [2, -1])`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(x.shape[0], -1))


def test_data_a_static_program_cannot_run(tmp_path, capfd):
    model, calib = tmp_path / "baked.pt2", tmp_path / "c.pt"
    torch.export.save(torch.export.export(BakedBatch().eval(), (torch.randn(2, 3, 4),)), model)
    torch.save(torch.rand(64, 3, 4), calib)
    assert main(["compile", str(model), "--data", str(calib), "--out", str(tmp_path / "d")]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not run on --data" in err and "Dim('batch')" in err, err


class TokenHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(100, 8), torch.nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(dim=1))


def test_data_the_program_cannot_take_is_not_blamed_on_the_batch(tmp_path, capfd):
    model, calib = tmp_path / "tokens.pt2", tmp_path / "ids.pt"
    ids = torch.randint(0, 100, (2, 5))
    torch.export.save(torch.export.export(TokenHead().eval(), (ids,)), model)
    torch.save(torch.randint(0, 1000, (16, 5)), calib)  # ids past the vocabulary
    assert main(["compile", str(model), "--data", str(calib), "--out", str(tmp_path / "d")]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "index out of range" in err and "vocabulary" in err, err
    assert "Dim('batch')" not in err


@pytest.mark.parametrize("args", [["compile", "digits-mlp", "--budget", "abc", "--out", "x"],
                                  ["study", "frontier", "digits-mlp", "--budgets", "abc"], ["--bogus"],
                                  ["capture", "m.pt2", "--input-shape", f"1{'0' * 24}x3"]])
def test_argument_errors_are_one_line_without_the_usage_block(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("bitmix: error:"), err


def test_version(capsys):
    from bitmix import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"bitmix {__version__}"


def test_capture_names_the_ops_that_stay_fp32(tmp_path, capsys):
    class Recurrent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(8, 16, batch_first=True)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    path = tmp_path / "rnn.pt2"
    torch.export.save(torch.export.export(Recurrent().eval(), (torch.randn(2, 5, 8),)), str(path))
    assert main(["capture", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "no bitmix kernel and stay FP32" in out and "lstm" in out


def test_a_method_without_its_data_points_at_the_clis_own_flags(tmp_path, capsys):
    """`bitmix compile x.pt2 --method alps` printed the Python advice "pass data=TaskData(...)"."""
    model = _export(tmp_path / "m.pt2")
    out = ["--out", str(tmp_path / "d")]
    assert main(["compile", model, "--method", "alps", *out]) == 2
    err = capsys.readouterr().err
    assert "needs labelled training data, which the CLI takes only from a zoo model's own data set" in err
    assert "(--method eagl / sqnr / uniform / random; --data FILE.pt gives calibration inputs)" in err
    assert main(["compile", model, "--method", "sqnr", *out]) == 2
    assert "needs unlabeled calibration inputs: pass --data FILE.pt" in capsys.readouterr().err


@pytest.mark.parametrize("forced", ["garbage", "unavailable"])
def test_bench_kernels_with_a_kernel_path_this_cpu_cannot_run_is_one_line(forced, monkeypatch):
    from bitmix.kernels import cpu

    if forced == "unavailable":
        missing = [p for p in cpu.PATHS if p not in cpu.available_paths()]
        if not missing:
            pytest.skip("this CPU runs every kernel path")
        forced = missing[-1]
    monkeypatch.setenv("BITMIX_KERNEL_PATH", forced)
    proc = run("bench", "kernels", "--quick")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"BITMIX_KERNEL_PATH={forced!r}" in lines[0], proc.stderr


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="AMX is Linux x86_64's")
def test_bench_model_without_amx_runs_bitmix_and_its_baselines_as_on_a_cpu_without_it(tmp_path):
    """`--no-amx` denies the tile state to the whole bench process (`cpu.deny_amx`): bitmix then picks a path
    without AMX, and the record and the table say the baselines ran without it too."""
    path = tmp_path / "r.json"
    proc = run("bench", "model", "digits-mlp", "--repeats", "1", "--no-ort", "--no-amx", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    (rec,) = json.loads(path.read_text())
    assert rec["amx_denied"] is True and rec["kernel_path"] != "avx512amx"
    assert "AMX denied to all" in " ".join(proc.stdout.split())


def test_bench_kernels_without_amx_denies_it_before_anything_runs(monkeypatch, capsys):
    """`bench kernels --no-amx` reaches `cpu.deny_amx` before the bench's first step (stopped there: the denial
    itself is `tests/kernels/test_cpu.py`'s, the flag's whole run `bench model`'s above)."""
    from bitmix.errors import BitmixError
    from bitmix.kernels import bench, cpu

    def deny() -> None:
        raise BitmixError("denied here")

    monkeypatch.setattr(cpu, "deny_amx", deny)
    monkeypatch.setattr(bench, "measure_cold_start", lambda *a, **k: pytest.fail("the bench ran before the denial"))
    assert main(["bench", "kernels", "--quick", "--no-amx"]) == 2
    assert "denied here" in capsys.readouterr().err
