"""Run jobs as Ray tasks on a local Ray or an existing cluster (`address=`).

The job function (with its `PortableModel`s and data) is `ray.put` once per run and passed
to every task as a top-level argument, which Ray resolves before the task starts; it travels as
pickled bytes under a run key (`_Shipped`), so a worker unpickles (rebuilds) it once per run and
later tasks only look the key up. (A `ray.get` inside the task would mark it blocked while the
object is fetched, so on a multi-node cluster Ray could start extra workers on that CPU.) Tasks run at
`threads` torch threads (`num_cpus=threads`), like the local executors, so results match
them bit for bit on workers of the same CPU kind. A task whose worker dies is re-run by Ray
up to `max_retries` times (jobs are deterministic, so the result is unchanged); a task that
raises is not retried and is reported in one line (reference/quantization.md §7, RAY-FT).
Ray's memory monitor kills the newest task when the node's memory (every process on it, not
only Ray's) passes 95 %, and by default retries such tasks forever: on a shared machine that
looks like a hang. The local Ray started here runs without it, like the local process pool (the
kernel's OOM killer still acts; a killed worker's job is retried); on a cluster whose monitor
gives up, the job is reported as out of memory in one line (docs.ray.io, "Out-Of-Memory Prevention").
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

from bitmix.compiler.sensitivity.executor import Describe, MapMixin, job_error, worker_threads
from bitmix.errors import BitmixError

CONNECT_TIMEOUT_S = 5.0
_FN: dict[str, Callable[[Any], Any]] = {}  # per worker: the current run's job function, by run key


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise BitmixError("the ray executor needs the `ray` package; install it with `pip install ray` "
                          "(`make setup` does), or use --executor local") from None
    return ray


class _Shipped:
    """A job function as pickled bytes under a run key. Ray deserialises task arguments on every
    call; this unpickles to the worker's cached function, so the bytes are unpickled once per run."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        from ray import cloudpickle  # Ray's own pickler: functions of __main__ and by-value modules travel

        self.key = uuid.uuid4().hex
        self.payload = cloudpickle.dumps(fn)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _received, (self.key, pickle.PickleBuffer(self.payload))  # out of band: not copied per task


def _received(key: str, payload: Any) -> Callable[[Any], Any]:
    if key not in _FN:
        _FN.clear()  # one run at a time per worker: drop the previous run's model
        _FN[key] = pickle.loads(payload)
    return _FN[key]


def _call(fn: Callable[[Any], Any], job: Any, threads: int) -> Any:
    """A task: run the shipped job function at `threads` threads."""
    worker_threads(threads)
    return fn(job)


def check_reachable(address: str) -> None:
    """Fail fast, in one line, when a host:port cluster address does not answer."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BitmixError(f"--ray-address must be host:port (e.g. 10.0.0.5:6379) or 'auto', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise BitmixError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
                          "`ray start --head` there, or drop --ray-address to run on a local Ray") from None


class RayExecutor(MapMixin):
    """Jobs as Ray tasks. Without `address` a local Ray with `workers` CPUs (default: all) is
    started on first use and shut down by `close()` or at the end of the `with` block; with an
    address the cluster is joined (and left again). A Ray the caller initialised is used as is."""

    def __init__(self, address: str | None = None, workers: int | None = None, threads: int = 1,
                 max_retries: int = 3) -> None:
        import_ray()
        if workers is not None and workers < 1:
            raise BitmixError(f"Ray workers must be >= 1, got {workers}")
        if address is not None and not isinstance(address, str):
            raise BitmixError(f"Ray address must be a string such as '10.0.0.5:6379', got {address!r}")
        if address is not None:
            check_reachable(address)  # fail before any work is done
        self.address = address
        self.threads = threads
        self.max_retries = max_retries
        self._workers = workers
        self._scopes: list[bool] = []
        self._started = False

    def start(self) -> bool:
        """Initialise or join Ray unless already connected; True if this call did."""
        ray = import_ray()
        if ray.is_initialized():
            return False
        common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        if self.address is None:
            try:  # "local": a new Ray, never one that `ray start` left running
                ray.init(address="local", num_cpus=self._workers or os.cpu_count() or 1, include_dashboard=False,
                         _system_config={"memory_monitor_refresh_ms": 0}, **common)
            except Exception as exc:  # Ray raises a bare Exception when its raylet does not come up in 30 s
                ray.shutdown()  # stop the daemons that did start
                raise BitmixError(f"could not start a local Ray ({str(exc).strip().splitlines()[0]}); on a busy "
                                  "machine try again, or use --executor local") from None
        else:
            check_reachable(self.address)
            try:
                ray.init(address=self.address, **common)
            except (ConnectionError, RuntimeError, ValueError) as exc:  # ValueError: a ray:// or http:// address
                raise BitmixError(f"cannot join the Ray cluster at {self.address}: {str(exc).splitlines()[0]}; "
                                  "check the address (`ray status` on the head node)") from None
        self._started = True
        return True

    def close(self) -> None:
        """Shut down (or leave) the Ray this executor started or joined."""
        if self._started:
            import_ray().shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        """A scope: Ray starts on first use inside it and is shut down when it ends if it was not running before."""
        self._scopes.append(import_ray().is_initialized())
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._scopes.pop():
            self.close()

    @property
    def workers(self) -> int:
        """Concurrent tasks: the cluster's CPUs over `threads` (starts Ray if needed)."""
        if not import_ray().is_initialized():
            self.start()
        return max(1, int(import_ray().cluster_resources().get("CPU", 1)) // self.threads)

    def as_completed(self, fn: Callable[[Any], Any], jobs: Sequence[Any],
                     describe: Describe = repr) -> Iterator[tuple[int, Any]]:
        ray = import_ray()
        if not ray.is_initialized():
            self.start()
        if not jobs:
            return
        from ray.exceptions import OutOfMemoryError, RayError, RayTaskError

        task = ray.remote(_call).options(num_cpus=self.threads, max_retries=self.max_retries)
        shipped = ray.put(_Shipped(fn))  # once per run; every task gets the reference
        pending = {task.remote(shipped, job, self.threads): i for i, job in enumerate(jobs)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except RayTaskError as exc:
                    raise job_error(describe, jobs[i], exc.cause if exc.cause is not None else exc) from None
                except OutOfMemoryError:
                    raise BitmixError(f"job {describe(jobs[i])} was killed by Ray's memory monitor (the node ran "
                                      "out of memory); run fewer jobs at once (workers) or give the method a "
                                      "smaller batch_size") from None
                except RayError as exc:
                    raise BitmixError(f"job {describe(jobs[i])} was lost after {self.max_retries} retries "
                                      f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from None
                yield i, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
