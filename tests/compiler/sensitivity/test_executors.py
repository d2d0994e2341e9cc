"""Executors on digits-cnn: serial, forked pool and Ray give the same scores and assignment, bit for bit;
a job whose Ray worker is killed is retried with the same result; a failing job is named in one line."""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from bitmix.compiler.allocate import Budget, allocate
from bitmix.compiler.fold import prepare
from bitmix.compiler.quantize import fake_quantize
from bitmix.compiler.sensitivity import (
    ALPSConfig,
    HAWQConfig,
    ProcessExecutor,
    ScoreContext,
    SerialExecutor,
    score,
)
from bitmix.compiler.transport import PortableModel
from bitmix.errors import BitmixError
from bitmix.ir.targets import get_target
from bitmix.simulator import price
from tests.conftest import captured, zoo_entry

ray = pytest.importorskip("ray")
from bitmix.compiler.sensitivity.ray_executor import RayExecutor  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

TARGET = "int4int2-npu"


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module, stopped even when a test fails."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cnn_ctx() -> ScoreContext:
    graph = captured("digits-cnn")
    _, _, data = zoo_entry("digits-cnn")
    return ScoreContext(graph, get_target(TARGET), prepare(graph), data)


ALPS = ALPSConfig(epochs=0.05)
HAWQ = HAWQConfig(samples=4, examples=64)


def _assignment(scores, ctx: ScoreContext) -> dict[str, int]:
    costs = price(ctx.graph, ctx.target)
    return allocate(scores, costs, ctx.target, ctx.graph.names, Budget(fraction=0.8)).assignment


class KillOnce:
    """Wraps a job function: the first attempt of `victim` kills its own worker process (SIGKILL)."""

    def __init__(self, fn, victim, marker: Path) -> None:
        self.fn, self.victim, self.marker = fn, victim, marker

    def __call__(self, job):
        if job == self.victim and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), 9)
        return self.fn(job)


class Killing:
    """An executor that runs through `inner` with one job's first worker killed."""

    def __init__(self, inner: RayExecutor, victim, marker: Path) -> None:
        self.inner, self.victim, self.marker = inner, victim, marker
        self.workers = 2

    def map(self, fn, jobs, describe=repr, label="jobs"):
        return self.inner.map(KillOnce(fn, self.victim, self.marker), jobs, describe, label)


def _fails_on_three(job: int) -> int:
    if job == 3:
        raise ValueError("boom\nsecond line")
    return job * 2


def test_portable_model_rebuilds_the_same_module(cnn_ctx):
    fq = fake_quantize(cnn_ctx.model, {n: 4 for n in cnn_ctx.free_layers}, cnn_ctx.calibration_inputs())
    shipped = pickle.loads(pickle.dumps(PortableModel(cnn_ctx.graph, fq))).module
    assert shipped is not fq and shipped.code == fq.code
    x = cnn_ctx.calibration_inputs()
    with torch.no_grad():
        assert torch.equal(shipped(*x), fq(*x))
    expected = fq.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in shipped.state_dict().items())


def test_hawq_serial_process_ray_identical(cnn_ctx, local_ray):
    runs = {name: score(HAWQ, dataclasses.replace(cnn_ctx, executor=ex)) for name, ex in
            (("serial", SerialExecutor()), ("process", ProcessExecutor(2)), ("ray", RayExecutor()))}
    assert runs["serial"] == runs["process"] == runs["ray"]
    assert any(v[2] > 0 for v in runs["serial"].values())
    assert _assignment(runs["serial"], cnn_ctx) == _assignment(runs["ray"], cnn_ctx)


def test_failing_job_is_named_in_one_line(local_ray):
    for ex in (SerialExecutor(), ProcessExecutor(2), RayExecutor()):
        with pytest.raises(BitmixError) as info:
            ex.map(_fails_on_three, list(range(5)), describe=lambda j: f"layer l{j}")
        assert str(info.value) == "job layer l3 failed: ValueError: boom"
    assert RayExecutor().map(_fails_on_three, [0, 1, 2]) == [0, 2, 4]


@pytest.mark.slow
def test_alps_serial_process_ray_identical(cnn_ctx, local_ray):
    runs = {name: score(ALPS, dataclasses.replace(cnn_ctx, executor=ex)) for name, ex in
            (("serial", SerialExecutor()), ("process", ProcessExecutor(2)), ("ray", RayExecutor()))}
    assert runs["serial"] == runs["process"] == runs["ray"]
    assert _assignment(runs["serial"], cnn_ctx) == _assignment(runs["ray"], cnn_ctx)


@pytest.mark.slow
def test_killed_worker_is_retried_with_the_same_result(cnn_ctx, local_ray, tmp_path):
    victim = (cnn_ctx.free_layers[0], 2)
    marker = tmp_path / "killed"
    serial = score(ALPS, dataclasses.replace(cnn_ctx, executor=SerialExecutor()))
    killed = score(ALPS, dataclasses.replace(cnn_ctx, executor=Killing(RayExecutor(), victim, marker)))
    assert marker.exists()  # the first attempt did die
    assert killed == serial


def test_compile_executor_ray_matches_local(local_ray):
    from bitmix.compiler.pipeline import CompileOptions, compile

    model, example, data = zoo_entry("digits-cnn")
    reports = {}
    for name in ("local", "ray"):
        cm = compile(model, example, TARGET, method=HAWQ, budget=0.8, data=data,
                     options=CompileOptions(frontier_points=0, executor=name))
        reports[name] = cm.report
    assert reports["ray"].layers == reports["local"].layers  # bits and scores per layer
    assert ray.is_initialized()  # a Ray the caller started is left running


def test_a_serial_run_starts_numbas_pool_on_bitmixs_layer():
    """pinned_threads read Numba's thread count before choosing the layer, which started Numba's default (omp)
    pool; a ProcessExecutor forked afterwards lost its workers ("fork() called from a process already using GNU
    OpenMP")."""
    import subprocess

    code = ("import numba\nfrom bitmix.compiler.sensitivity.executor import pinned_threads\n"
            "with pinned_threads(1):\n    pass\nprint(numba.threading_layer())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() in ("tbb", "workqueue")

