"""ALPS on minilm, one seed: serial vs forked process pool vs Ray (same number of workers), plus per-job overhead.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/executors.py [--json out.json] [--model minilm]
        [--alps-epochs F] [--base-epochs N] [--executors process ray] [--rounds 2] [--serial]

The base model is fine-tuned once (`alps_jobs`, the same for every executor); what is timed
per executor is `executor.map` over ALPS's jobs (the reference plus one job per free layer and
lower precision), i.e. exactly the part an executor runs. Executors are interleaved in rounds
(process, ray, process, ray, ...) because other work loads this machine; each run records the
1-minute load average before and after and the peak RSS of this process and its children
(pool workers, Ray's workers and daemons) and the CPU seconds each kind of process used
(exited pool workers as "exited children"). Ray's local start (`ray.init`) is timed apart: on
a running cluster it is paid once, and so is each worker's start (importing torch and bitmix):
the Ray map is timed again on the warm workers (`warm_wall_s`). Every run must return the same
results, bit for bit. Ray starts its workers at nice +15 by default (they yield to anything else on
the machine); the benchmark sets `RAY_worker_niceness=0` so both executors' workers run at the
driver's priority (run it under `nice -n -19` on a shared machine to keep other work off it).

Per-job overhead, per executor: no-op jobs mapped in two sizes give the cost per job (dispatch,
result, bookkeeping) and the fixed cost per `map` (the process pool forks its workers per map);
for Ray also the once-per-run costs of shipping the job function: its pickled size, `ray.put`,
and one worker's fetch + rebuild (`torch.export.load` + `fold.prepare`).
The JSON is rewritten after each run, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BITMIX_QUIET", "1")
os.environ.setdefault("RAY_worker_niceness", "0")  # the pool's workers run at the driver's priority too

from bitmix import zoo  # noqa: E402
from bitmix.compiler.capture import capture  # noqa: E402
from bitmix.compiler.fold import prepare  # noqa: E402
from bitmix.compiler.sensitivity import ALPSConfig, ProcessExecutor, ScoreContext, SerialExecutor  # noqa: E402
from bitmix.compiler.sensitivity.alps import ALPSJobs, alps_jobs  # noqa: E402
from bitmix.compiler.sensitivity.ray_executor import RayExecutor, import_ray  # noqa: E402
from bitmix.ir.targets import get_target  # noqa: E402
from bitmix.study.config import TARGET, default_config  # noqa: E402


def _noop(job: int) -> int:
    return job


def _fetch(holder: list) -> float:
    """On a worker: seconds to fetch and unpickle (rebuild) the shipped job function."""
    import ray

    start = time.perf_counter()
    ray.get(holder[0])
    return time.perf_counter() - start


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def _tree() -> dict[int, tuple[str, float]]:
    """This process and all its descendants (Ray's daemons and workers descend from the driver):
    pid -> (command name, CPU seconds so far)."""
    stats: dict[int, tuple[int, str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    head, tail = f.read().rsplit(")", 1)
                fields = tail.split()
                stats[int(entry)] = (int(fields[1]), head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / tick)
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        children = [c for c, st in stats.items() if st[0] == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    return {pid: stats[pid][1:] for pid in tree if pid in stats}


def _tree_rss_gb() -> float:
    return sum(_rss_kb(pid) for pid in _tree()) / 2**20


def cpu_by_process(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between two `_tree()` snapshots, per command name (e.g. raylet, gcs_server, ray::_call)."""
    used: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        used[name] = used.get(name, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
    return {k: round(v, 1) for k, v in sorted(used.items(), key=lambda kv: -kv[1])}


@contextmanager
def peak_rss(period_s: float = 1.0) -> Iterator[list[float]]:
    """Samples the process tree's RSS while the block runs; yields a one-element list with the peak (GB)."""
    peak = [_tree_rss_gb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(period_s):
            peak[0] = max(peak[0], _tree_rss_gb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def timed_map(executor: Any, work: ALPSJobs) -> tuple[float, list[float], float, dict[str, float]]:
    """(wall s, results, peak RSS GB, CPU s per process name) of one executor over all ALPS jobs."""
    with peak_rss() as peak:
        before, reaped = _tree(), os.times()
        start = time.perf_counter()
        results = executor.map(work.run, work.jobs)
        wall = time.perf_counter() - start
        cpu = cpu_by_process(before, _tree())
        cpu["exited children"] = round(sum(os.times()[2:4]) - sum(reaped[2:4]), 1)
    return wall, results, peak[0], cpu


def overhead(executor: Any, jobs: int, workers: int) -> dict[str, float]:
    """Fixed cost per `map` call and cost per job, from no-op maps of 2 x workers and `jobs` jobs
    (the difference over the extra jobs is the per-job cost; what remains is the fixed cost)."""
    def wall(n: int) -> float:
        start = time.perf_counter()
        assert executor.map(_noop, list(range(n))) == list(range(n))
        return time.perf_counter() - start

    small = 2 * workers
    t_small, t_big = wall(small), wall(jobs)
    per_job = max(0.0, (t_big - t_small) / (jobs - small))
    return {"noop_job_ms": per_job * 1e3, "noop_map_fixed_ms": (t_small - small * per_job) * 1e3}


def ray_shipping(fn: Callable) -> dict[str, float]:
    """Once-per-run costs of shipping `fn`: pickled size, `ray.put`, and one worker's fetch + rebuild."""
    ray = import_ray()
    size = len(pickle.dumps(fn))
    start = time.perf_counter()
    ref = ray.put(fn)
    put_s = time.perf_counter() - start
    fetch_s = ray.get(ray.remote(_fetch).options(num_cpus=1).remote([ref]))
    return {"pickled_mb": size / 2**20, "put_s": put_s, "worker_fetch_rebuild_s": fetch_s}


def run_once(name: str, args: argparse.Namespace, work: ALPSJobs) -> dict[str, Any]:
    """One timed run of `name` over the ALPS jobs, with its overheads and the machine's load."""
    record: dict[str, Any] = {"executor": name, "load_before": os.getloadavg()[0]}
    if name == "ray":
        with RayExecutor(workers=args.workers) as ex:
            start = time.perf_counter()
            ex.start()
            record["ray_start_s"] = time.perf_counter() - start
            record["wall_s"], results, record["peak_rss_gb"], record["cpu_s"] = timed_map(ex, work)
            record["load_after"] = os.getloadavg()[0]
            if args.warm:  # again on the now warm workers: a cluster that is already running
                start = time.perf_counter()
                record["warm_identical"] = ex.map(work.run, work.jobs) == results
                record["warm_wall_s"] = time.perf_counter() - start
            record |= overhead(ex, args.noop_jobs, args.workers)
            record["shipping"] = ray_shipping(work.run)
    else:
        ex = SerialExecutor() if name == "serial" else ProcessExecutor(args.workers)
        record["wall_s"], results, record["peak_rss_gb"], record["cpu_s"] = timed_map(ex, work)
        record["load_after"] = os.getloadavg()[0]
        record |= overhead(ex, args.noop_jobs, args.workers)
    record["results"] = results
    return record


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per executor and Ray / process ratios within each round (adjacent runs)."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["executor"] for r in runs):
        mine = [r for r in runs if r["executor"] == name]
        out[name] = {"median_wall_s": statistics.median(r["wall_s"] for r in mine),
                     "median_noop_job_ms": statistics.median(r["noop_job_ms"] for r in mine),
                     "median_noop_map_fixed_ms": statistics.median(r["noop_map_fixed_ms"] for r in mine),
                     "runs": len(mine)}
    pairs = [(p, r) for p, r in zip(runs, runs[1:], strict=False)
             if (p["executor"], r["executor"]) == ("process", "ray")]
    if pairs:
        ratios = [r["wall_s"] / p["wall_s"] for p, r in pairs]
        out["ray_over_process_per_round"] = ratios
        out["ray_over_process_median"] = statistics.median(ratios)
        out["ray_with_start_over_process_median"] = statistics.median(
            (r["wall_s"] + r["ray_start_s"]) / p["wall_s"] for p, r in pairs)
        out["ray_over_process_of_medians"] = out["ray"]["median_wall_s"] / out["process"]["median_wall_s"]
        if all("warm_wall_s" in r for _, r in pairs):
            out["warm_ray_over_process_median"] = statistics.median(r["warm_wall_s"] / p["wall_s"] for p, r in pairs)
    if {"serial", "process"} <= set(out):
        out["process_over_serial"] = out["process"]["median_wall_s"] / out["serial"]["median_wall_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--noop-jobs", type=int, default=200)
    parser.add_argument("--alps-epochs", type=float, help="fraction of an epoch per ALPS job (default: the study's)")
    parser.add_argument("--base-epochs", type=int, help="the base's fine-tune epochs (default: ALPS's 1; 0 to "
                        "iterate faster: the jobs then start from the unfine-tuned base)")
    parser.add_argument("--executors", nargs="+", choices=("process", "ray", "serial"), default=["process", "ray"])
    parser.add_argument("--rounds", type=int, default=2, help="times the --executors sequence is run, interleaved")
    parser.add_argument("--serial", action="store_true", help="also one serial run (after the rounds)")
    parser.add_argument("--no-warm", dest="warm", action="store_false",
                        help="skip the second Ray map on the warm workers")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model, example, data = zoo.load(args.model)
    graph = capture(model, example, args.model)
    alps = default_config(args.model).method("alps")
    alps = alps if isinstance(alps, ALPSConfig) else ALPSConfig()
    if args.alps_epochs is not None:
        alps = dataclasses.replace(alps, epochs=args.alps_epochs)
    if args.base_epochs is not None:
        alps = dataclasses.replace(alps, base_epochs=args.base_epochs)
    ctx = ScoreContext(graph, get_target(TARGET), prepare(graph), data, seed=0)
    start = time.perf_counter()
    work = alps_jobs(ctx, alps)
    base_s = time.perf_counter() - start
    head = {"model": args.model, "target": TARGET, "jobs": len(work.jobs), "workers": args.workers,
            "options": dataclasses.asdict(alps), "cpu_count": os.cpu_count(), "base_finetune_s": base_s}
    print(f"{args.model}: ALPS {len(work.jobs)} jobs, base fine-tuned in {base_s:.0f} s, options {head['options']}",
          flush=True)

    order = [name for _ in range(args.rounds) for name in args.executors] + (["serial"] * args.serial)
    runs: list[dict[str, Any]] = []
    for name in order:
        runs.append(run_once(name, args, work))
        r = runs[-1]
        print(f"  {name}: {r['wall_s']:.1f} s (load {r['load_before']:.1f} -> {r['load_after']:.1f}, "
              f"peak RSS {r['peak_rss_gb']:.1f} GB); no-op job {r['noop_job_ms']:.2f} ms + "
              f"{r['noop_map_fixed_ms']:.0f} ms per map", flush=True)
        identical = all(x["results"] == runs[0]["results"] for x in runs)
        result = head | {"identical_results": identical, "summary": summary(runs),
                         "runs": [{k: v for k, v in x.items() if k != "results"} for x in runs]}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
