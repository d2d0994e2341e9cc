"""ALPS on minilm, one seed: serial vs forked process pool (2) vs Ray (2 workers), plus per-job overhead.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/executors.py [--json out.json] [--model minilm]
        [--alps-epochs F] [--executors process ray serial]

Each executor scores the same context (the frontier study's minilm ALPS options) from the
same seed; the scores must be identical (checked and reported). Wall time of `score("alps")`
per executor; Ray's local start is timed apart (on a running cluster it is paid once), and
the ratio Ray / process pool is given with and without it. Per-job overhead: wall time per
job of a no-op job mapped `--noop-jobs` times (dispatch, result, bookkeeping), and for ALPS
(Ray wall − process wall) / jobs. Timings are single runs on a shared 2-core machine. Shorter
`--alps-epochs` than the study's 0.25 make jobs shorter and so Ray's fixed costs weigh more.
The JSON is rewritten after each executor, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BITMIX_QUIET", "1")

from bitmix import zoo  # noqa: E402
from bitmix.compiler.capture import capture  # noqa: E402
from bitmix.compiler.fold import prepare  # noqa: E402
from bitmix.compiler.sensitivity import (  # noqa: E402
    ALPSConfig,
    ProcessExecutor,
    ScoreContext,
    SerialExecutor,
    score,
)
from bitmix.compiler.sensitivity.ray_executor import RayExecutor, import_ray  # noqa: E402
from bitmix.ir.targets import get_target  # noqa: E402
from bitmix.study.config import TARGET, default_config  # noqa: E402


def _noop(job: int) -> int:
    return job


def per_job_ms(executor, jobs: int) -> float:
    start = time.perf_counter()
    executor.map(_noop, list(range(jobs)))
    return (time.perf_counter() - start) / jobs * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--noop-jobs", type=int, default=200)
    parser.add_argument("--alps-epochs", type=float, help="fraction of an epoch per ALPS job (default: the study's)")
    parser.add_argument("--executors", nargs="+", choices=("process", "ray", "serial"),
                        default=["process", "ray", "serial"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model, example, data = zoo.load(args.model)
    graph = capture(model, example, args.model)
    alps = default_config(args.model).method("alps")
    alps = alps if isinstance(alps, ALPSConfig) else ALPSConfig()
    if args.alps_epochs is not None:
        alps = dataclasses.replace(alps, epochs=args.alps_epochs)
    options = dataclasses.asdict(alps)
    ctx = ScoreContext(graph, get_target(TARGET), prepare(graph), data, seed=0)
    jobs = 1 + len(ctx.free_layers) * (len(ctx.target.choices) - 1)
    print(f"{args.model}: ALPS {jobs} jobs, options {options}", flush=True)

    ray = import_ray()
    make = {"serial": SerialExecutor, "process": lambda: ProcessExecutor(args.workers), "ray": RayExecutor}
    wall, scores, overhead = {}, {}, {}
    ray_start_s = 0.0
    try:
        for name in args.executors:
            ex = make[name]()
            if name == "ray":  # started only now, so it cannot slow the others down
                start = time.perf_counter()
                ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
                ray_start_s = time.perf_counter() - start
            start = time.perf_counter()
            scores[name] = score(alps, dataclasses.replace(ctx, executor=ex))
            wall[name] = time.perf_counter() - start
            overhead[name] = per_job_ms(ex, args.noop_jobs)
            print(f"  {name}: {wall[name]:.1f} s; no-op job {overhead[name]:.2f} ms", flush=True)
            if name == "ray":
                ray.shutdown()  # before the next executor, so idle Ray processes do not slow it down
            report(args, jobs, options, wall, scores, overhead, ray_start_s)
    finally:
        ray.shutdown()


def report(args: argparse.Namespace, jobs: int, options: dict, wall: dict, scores: dict, overhead: dict,
           ray_start_s: float) -> None:
    result = {"model": args.model, "jobs": jobs, "workers": args.workers, "options": options, "wall_s": wall,
              "noop_job_ms": overhead, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
              "identical_scores": len({json.dumps(s, sort_keys=True) for s in scores.values()}) == 1}
    if "ray" in wall:
        result["ray_start_s"] = ray_start_s
    if {"ray", "process"} <= set(wall):
        result |= {"ray_over_process": wall["ray"] / wall["process"],
                   "ray_with_start_over_process": (wall["ray"] + ray_start_s) / wall["process"],
                   "alps_overhead_per_job_s": (wall["ray"] - wall["process"]) / jobs}
    if {"serial", "process"} <= set(wall):
        result["process_over_serial"] = wall["process"] / wall["serial"]
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
