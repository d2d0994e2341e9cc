"""The `bitmix` command. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.table import Table

from bitmix.errors import BitmixError
from bitmix.ir.targets import DEFAULT_TARGET, TARGETS

console = Console(width=None if sys.stdout.isatty() else 160)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) if shape else "-"


def cmd_models(args: argparse.Namespace) -> int:
    from bitmix import zoo
    from bitmix.compiler.capture import capture

    table = Table(title="bitmix zoo (all offline)")
    for col in ("name", "layers", "params", "MACs", "description"):
        table.add_column(col, justify="right" if col in ("layers", "params", "MACs") else "left")
    for name, entry in zoo.MODELS.items():
        if args.no_stats:
            table.add_row(name, "", "", "", entry.description)
            continue
        model, inputs, _ = zoo.load(name)
        graph = capture(model, inputs, name)
        table.add_row(name, str(len(graph.layers)), f"{graph.total_params:,}", f"{graph.total_macs:,}",
                      entry.description)
    console.print(table)
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from bitmix.compiler.capture import capture
    from bitmix.tools.models import load_model

    loaded = load_model(args.model, args.input_shape)
    graph = capture(loaded.model, loaded.inputs, loaded.name)
    table = Table(title=f"{loaded.name}: {len(graph.layers)} quantizable layers")
    for col in ("#", "name", "kind", "weight", "input", "output", "MACs", "params"):
        table.add_column(col, justify="right" if col in ("#", "MACs", "params") else "left")
    for i, layer in enumerate(graph.layers):
        table.add_row(str(i), layer.name, layer.kind, _fmt_shape(layer.weight_shape), _fmt_shape(layer.input_shape),
                      _fmt_shape(layer.output_shape), f"{layer.macs:,}", f"{layer.params:,}")
    table.add_section()
    table.add_row("", "total", "", "", "", "", f"{graph.total_macs:,}", f"{graph.total_params:,}")
    console.print(table)
    console.print(f"{len(graph.vector_ops)} non-quantizable ops stay in floating point on the vector unit")
    if graph.unsupported:
        console.print(f"{len(graph.unsupported)} weight-bearing op(s) have no bitmix kernel and stay FP32 (not priced "
                      f"by the simulator): {', '.join(graph.unsupported)}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from bitmix.budget import Budget
    from bitmix.compiler.pipeline import CompileOptions, compile
    from bitmix.compiler.sensitivity import data_free, label_free, resolve
    from bitmix.ir.targets import get_target
    from bitmix.report import print_report, save_report
    from bitmix.task import Data
    from bitmix.tools.models import load_calibration, load_model

    executor = _executor(args)  # a bad --ray-address fails before any work
    loaded = load_model(args.model, args.input_shape)
    model, inputs, data = loaded.model, loaded.inputs, loaded.data
    if args.data and data is not None:
        raise BitmixError(f"zoo model {args.model!r} brings its own data; --data is for .pt2 programs")
    calibration = load_calibration(args.data, inputs, model) if args.data else data
    if args.eval and data is None:
        raise BitmixError(f"model {args.model!r} has no evaluation data in the zoo; drop --eval")
    epochs = args.finetune_epochs
    if epochs is None:  # auto: LSQ needs a short QAT run to recover 2-bit layers: the task's own recipe
        epochs = data.recipe.epochs if data is not None else 0
    if epochs < 0:
        raise BitmixError(f"--finetune-epochs must be >= 0, got {epochs}")
    if epochs and data is None:
        raise BitmixError(f"model {args.model!r} has no training data in the zoo; drop --finetune-epochs")
    method = resolve(args.method)[0]  # the pipeline's advice names Python arguments (data=...): the CLI's instead
    if data is None and method.needs_data:
        raise BitmixError(f"method {args.method!r} needs labelled training data, which the CLI takes only from a zoo "
                          f"model's own data set (`bitmix models`); for {args.model!r} use a method without labels "
                          f"(--method {' / '.join(label_free())}; --data FILE.pt gives calibration inputs), or "
                          "bitmix.compile(..., data=bitmix.Data(train=loader)) in Python")
    if calibration is None and method.needs_calibration:
        raise BitmixError(f"method {args.method!r} needs unlabeled calibration inputs: pass --data FILE.pt (a tensor, "
                          f"or a tuple of one per input, saved with torch.save), or use a data-free method (--method "
                          f"{' / '.join(data_free())})")
    finetune = dataclasses.replace(data.recipe, epochs=epochs) if epochs else None
    goals = {"fps": args.fps, "latency_s": args.latency, "energy_j": args.energy}
    given = any(v is not None for v in goals.values())
    if given and args.budget is not None:
        raise BitmixError("give --budget or absolute goals (--fps, --latency, --energy), not both")
    budget = Budget(**goals) if given else args.budget
    cm = compile(model, inputs, get_target(args.target, args.config), method=args.method, budget=budget,
                 data=Data(calibration=calibration, train=data, eval=data if args.eval else None), finetune=finetune,
                 seed=args.seed, options=CompileOptions(name=loaded.name, frontier_points=args.frontier_points,
                                                       executor=executor, strategy=args.strategy))
    assert cm.report is not None
    print_report(cm.report)
    html = save_report(cm.report, args.out)
    console.print(f"report: {html.resolve()} (and report.json, plots in {html.parent})")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from bitmix.tools.simulate import simulate_model_cli

    return simulate_model_cli(args.model, args.bits, args.config, args.engine, args.json, args.input_shape)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "model":
        from bitmix.tools.speed import run_model_bench

        run_model_bench(args.models or None, repeats=args.repeats, json_path=args.json, ort=not args.no_ort,
                        target=args.target, no_amx=args.no_amx)
        return 0
    from bitmix.kernels.bench import run_kernel_bench

    run_kernel_bench(quick=args.quick, json_path=args.json, no_amx=args.no_amx)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from bitmix.study import MODELS, run_study

    models = list(MODELS) if args.model == "all" else [args.model]
    run_study(models, args.out, methods=args.methods, budgets=args.budgets, seeds=args.seeds, quick=args.quick,
              workers=args.workers, results=args.results, log=lambda msg: console.print(msg, highlight=False),
              executor=_executor(args), additivity=args.additivity, method_seeds=dict(args.method_seeds or []))
    console.print(f"study written under {args.out}" + (f"; results page {args.results}" if args.results else ""))
    return 0


def _executor(args: argparse.Namespace) -> object:
    """--executor / --ray-address -> None (local) or a RayExecutor (an address implies ray)."""
    if args.ray_address is not None and not args.ray_address.strip():
        raise BitmixError("--ray-address is empty; give the cluster's host:port (or 'auto'), or drop it")
    if args.executor == "local" and args.ray_address:
        raise BitmixError("--ray-address needs --executor ray (or drop --executor)")
    if args.executor == "ray" or args.ray_address:
        from bitmix.compiler.sensitivity.ray_executor import RayExecutor

        return RayExecutor(address=args.ray_address)
    return None


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("local", "ray"), help="where per-layer and per-point jobs run: local "
                   "processes (default) or Ray (a local Ray sized to the machine, or the cluster at --ray-address)")
    p.add_argument("--ray-address", help="join this Ray cluster (host:port of `ray start --head`, or 'auto')")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "models": cmd_models,
    "capture": cmd_capture,
    "compile": cmd_compile,
    "simulate": cmd_simulate,
    "bench": cmd_bench,
    "study": cmd_study,
}


def _positive_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _method_seeds(text: str) -> tuple[str, int]:
    method, _, n = text.partition("=")
    try:
        return method, int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected METHOD=N (e.g. alps=2), got {text!r}") from None


def _shape(text: str) -> tuple[int, ...]:
    from bitmix.tools.models import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a zoo model (see `bitmix models`) or a .pt2 file written by torch.export.save")
    p.add_argument("--input-shape", type=_shape, action="append", metavar="NxCxHxW",
                   help="example input shape for a .pt2 program (once per input; default: the program's own)")


class _Parser(argparse.ArgumentParser):
    """argparse with bitmix's one-line errors (exit 2) instead of the usage block before them; subcommands'
    parsers are made from the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"bitmix: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bitmix", description="Mixed-precision quantization for NPUs")
    parser.add_argument("--version", action="version", version=f"bitmix {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the offline model zoo")
    p.add_argument("--no-stats", action="store_true", help="skip capturing each model for layer/MAC counts")
    p = sub.add_parser("capture", help="capture a model and print its quantizable layers")
    _add_model(p)
    p = sub.add_parser("compile", help="choose per-layer bits, lower to kernels, simulate, write the report")
    _add_model(p)
    p.add_argument("--data", metavar="FILE.pt", help="calibration inputs for a .pt2 program: a tensor (or a tuple, "
                   "one per input) saved with torch.save, batch first")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"one of {', '.join(TARGETS)} (default "
                   f"{DEFAULT_TARGET})")
    p.add_argument("--method", default="eagl")
    p.add_argument("--strategy", choices=("knapsack", "pareto-greedy", "pareto-greedy-normalised"),
                   help="how scores become an assignment: the exact knapsack (default for scoring methods) or "
                   "AIMET AMP's Pareto-greedy search")
    p.add_argument("--budget", type=_positive_float, default=None,
                   help="simulated cost allowed, as a fraction of the all-highest-choice cost (default 0.75, raised "
                   "to the cheapest assignment where that costs more; 1 for a one-choice target such as int8-npu)")
    p.add_argument("--fps", type=_positive_float, help="absolute goal instead of --budget: frames/s (a frame is "
                   "one item of the input's batch; several chips: the pipeline's rate)")
    p.add_argument("--latency", type=_positive_float, help="absolute goal: latency of one run (the input's whole "
                   "batch) in seconds, as the report's simulated latency")
    p.add_argument("--energy", type=_positive_float, help="absolute goal: energy per frame in joules")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="LSQ fine-tuning epochs after allocation (default: the zoo task's recipe -- digits 3 "
                   "epochs SGD, minilm 1 epoch Adam; 0 for models without data)")
    p.add_argument("--eval", action="store_true", help="measure quality: FP32, fake-quant and on the kernels")
    p.add_argument("--config", help="chip configuration TOML overriding the simulator defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frontier-points", type=int, default=6, help="knapsack points on the report's frontier")
    p.add_argument("--out", required=True, help="directory for report.json, report.html and plots")
    _add_executor_args(p)
    p = sub.add_parser("simulate", help="simulate a model at one precision on the NorthPole-style chip")
    _add_model(p)
    p.add_argument("--bits", default="8", help="precision of every layer: 8, 4, 2 or a weight/activation pair "
                   "such as 4/8 (weights no wider than activations), 4/8r with the linears' inputs rotated")
    p.add_argument("--config", help="chip configuration TOML")
    p.add_argument("--engine", choices=("analytic", "cycle"), default="analytic")
    p.add_argument("--json", help="write the SimResult as JSON to this file")
    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="suite", required=True)
    k = bench.add_parser("kernels", help="packed int kernels vs torch fp32 and torch int8 dynamic")
    k.add_argument("--json", help="write one record per case and baseline")
    k.add_argument("--quick", action="store_true", help="a few small cases, well under a minute")
    k.add_argument("--no-amx", action="store_true", help="run as on a CPU without AMX (see `bench model --no-amx`)")
    m = bench.add_parser("model", help="compiled zoo models (on the kernels) vs eager FP32 torch and ORT int8")
    m.add_argument("models", nargs="*", help="zoo models (default: digits-cnn resnet18 resnet50 mobilenetv2 minilm)")
    m.add_argument("--repeats", type=int, default=20, help="timed calls per model and contender (median)")
    m.add_argument("--target", default=DEFAULT_TARGET, help="compile at this target's highest choice (default "
                   f"{DEFAULT_TARGET}: all-4-bit, first/last 8; int8-npu: like for like with ORT int8)")
    m.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime int8 baseline")
    m.add_argument("--no-amx", action="store_true", help="run as on a CPU without AMX: deny the AMX tile state to "
                   "this process, so bitmix, torch and ONNX Runtime all take their AVX-512 code")
    m.add_argument("--json", help="write one record per model")
    p = sub.add_parser("study", help="studies over many compiles (accuracy-throughput frontier)")
    study = p.add_subparsers(dest="study", required=True)
    f = study.add_parser("frontier", help="every method x budget x seed: fine-tune, run on kernels, simulate")
    f.add_argument("model", help="digits-cnn, digits-mlp, digits-cnn-ptq (no fine-tuning), minilm-ptq, a -w4a8 "
                   "variant (target w4a8-npu: digits-cnn-w4a8, digits-cnn-ptq-w4a8, minilm-ptq-w4a8), minilm-ptq-w4a8r "
                   "(target w4a8r-npu), minilm, or all")
    f.add_argument("--methods", nargs="+", help="default: eagl alps hawq limpq sqnr uniform random")
    f.add_argument("--budgets", type=_positive_float, nargs="+",
                   help="fractions of the all-4-bit cost (default: 0.55 0.6 0.7 0.8 0.9 1.0, plus "
                   "feasible ones for digits-mlp and minilm)")
    f.add_argument("--seeds", type=int, help="seeds per point (default: 5)")
    f.add_argument("--quick", action="store_true",
                   help="one seed, two budgets, two methods, one fine-tune epoch (none for -ptq studies)")
    f.add_argument("--method-seeds", type=_method_seeds, nargs="+", metavar="METHOD=N",
                   help="fewer seeds for a costly method (e.g. alps=2); the others keep --seeds")
    f.add_argument("--additivity", type=int, help="random assignments per additivity set (0 = skip the check; "
                   "default 16, 6 for minilm)")
    f.add_argument("--workers", type=int, default=2, help="forked worker processes (1 torch thread each)")
    f.add_argument("--results", help="also render this markdown page (e.g. docs/results.md) from every model in --out")
    f.add_argument("--out", required=True, help="directory; results are cached in <out>/<model>/ and resumed")
    _add_executor_args(f)
    return parser


def _version() -> str:
    from bitmix import __version__

    return __version__


OUTPUT_DIRS = ("out",)  # argument names that are directories bitmix writes into
OUTPUT_FILES = ("json", "results")  # ... and files it writes
INPUT_FILES = ("config", "data")  # ... and files it reads


def check_not_empty(args: argparse.Namespace) -> None:
    """Refuse an empty path, which the commands took as no path at all (`--json ""` wrote nothing, `--config ""`
    priced the default chip) or as the current directory (`--out ""`)."""
    for name in OUTPUT_DIRS + OUTPUT_FILES + INPUT_FILES:
        value = getattr(args, name, None)
        if value is not None and not value.strip():
            what = "a directory" if name in OUTPUT_DIRS else f"a file path, or drop --{name}"
            raise BitmixError(f"--{name} is empty; give {what}")


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output path bitmix could not write before any work (a compile can take minutes).

    Writes (and drops) a probe file in the nearest existing directory on the path, creating nothing.
    """
    for name, is_dir in [(n, True) for n in OUTPUT_DIRS] + [(n, False) for n in OUTPUT_FILES]:
        value = getattr(args, name, None)
        if not value:
            continue
        path = Path(value)
        if path.exists() and path.is_dir() != is_dir:
            raise BitmixError(f"--{name} {value!r} is {'a file' if is_dir else 'a directory'}; give a "
                              f"{'directory' if is_dir else 'file path'}")
        where = path.absolute() if is_dir else path.absolute().parent
        while not where.exists():
            where = where.parent
        try:
            tempfile.TemporaryFile(dir=where).close()  # the probe: created, then dropped
        except OSError as exc:
            raise BitmixError(f"--{name} {value!r}: cannot write there ({exc.strerror or exc}); "
                              "choose a writable path") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_not_empty(args)
        check_outputs(args)
        with warnings.catch_warnings():
            # bitmix's own warnings land in the report, which the commands print once, on one line each
            warnings.filterwarnings("ignore", category=UserWarning, module="bitmix")
            return COMMANDS[args.command](args)
    except BitmixError as exc:
        print(f"bitmix: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitmix: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for users; BITMIX_DEBUG=1 shows it
        if os.environ.get("BITMIX_DEBUG"):
            raise
        print(f"bitmix: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(rerun with BITMIX_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
