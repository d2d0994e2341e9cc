"""The `bitmix` command. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

from bitmix.errors import BitmixError

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
    from bitmix import zoo
    from bitmix.compiler.capture import capture

    model, inputs, _ = zoo.load(args.model)
    graph = capture(model, inputs, args.model)
    table = Table(title=f"{args.model}: {len(graph.layers)} quantizable layers")
    for col in ("#", "name", "kind", "weight", "input", "output", "MACs", "params"):
        table.add_column(col, justify="right" if col in ("#", "MACs", "params") else "left")
    for i, layer in enumerate(graph.layers):
        table.add_row(str(i), layer.name, layer.kind, _fmt_shape(layer.weight_shape), _fmt_shape(layer.input_shape),
                      _fmt_shape(layer.output_shape), f"{layer.macs:,}", f"{layer.params:,}")
    table.add_section()
    table.add_row("", "total", "", "", "", "", f"{graph.total_macs:,}", f"{graph.total_params:,}")
    console.print(table)
    console.print(f"{len(graph.vector_ops)} non-quantizable ops stay in floating point on the vector unit")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "models": cmd_models,
    "capture": cmd_capture,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitmix", description="Mixed-precision quantization for NPUs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the offline model zoo")
    p.add_argument("--no-stats", action="store_true", help="skip capturing each model for layer/MAC counts")
    p = sub.add_parser("capture", help="capture a model and print its quantizable layers")
    p.add_argument("model")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
