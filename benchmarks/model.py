"""End-to-end CPU speed of compiled zoo models vs eager FP32: ``python benchmarks/model.py [MODEL ...]``.

Thin wrapper; the logic lives in ``bitmix.tools.speed`` (also ``bitmix bench model``).
"""

from __future__ import annotations

import argparse

from bitmix.tools.speed import run_model_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", help="zoo models (default: a CNN, ResNets, MobileNetV2, MiniLM)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    run_model_bench(args.models or None, repeats=args.repeats, json_path=args.json_path)


if __name__ == "__main__":
    main()
