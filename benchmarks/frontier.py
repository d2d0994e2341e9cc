"""Accuracy–throughput frontier study of every sensitivity method on the zoo models with data.

    .venv/bin/python benchmarks/frontier.py --out /tmp/bitmix-study --results docs/results.md

is the same as `bitmix study frontier all --out ... --results ...`: digits-cnn, digits-mlp and
minilm, methods eagl alps hawq limpq sqnr uniform random, budgets 0.55–1.0 of the all-4-bit cost,
5 seeds (3 for minilm), one fine-tuning recipe, quality on the packed kernels. Resumable: rerun
the same command after an interruption. The work lives in `bitmix.study` (sweep, store, stats, render).
"""

from __future__ import annotations

import argparse
import sys

from bitmix.study import MODELS, run_study


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(MODELS), help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--budgets", type=float, nargs="+")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", help="markdown page to render, e.g. docs/results.md")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    run_study(args.models, args.out, args.methods, args.budgets, args.seeds, args.quick, args.workers, args.results,
              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
