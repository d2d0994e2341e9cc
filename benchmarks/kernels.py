"""Kernel microbenchmarks: ``python benchmarks/kernels.py [--quick] [--json FILE]``.

Thin wrapper; the logic lives in ``bitmix.kernels.bench`` (also ``bitmix bench kernels``).
"""

from __future__ import annotations

import argparse

from bitmix.kernels.bench import run_kernel_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (well under a minute)")
    parser.add_argument("--json", dest="json_path", default=None, help="write one record per (case, baseline)")
    args = parser.parse_args()
    run_kernel_bench(quick=args.quick, json_path=args.json_path)


if __name__ == "__main__":
    main()
