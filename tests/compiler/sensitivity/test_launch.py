"""`executor=` objects are held to the protocol the methods use; a bad Ray address is one line."""

from __future__ import annotations

import pytest

from bitmix.compiler.sensitivity import SerialExecutor, open_executor
from bitmix.errors import BitmixError


class _DropsLast(SerialExecutor):
    def map(self, fn, jobs, describe=repr, label="jobs"):  # noqa: ANN001, ANN201
        return super().map(fn, jobs, describe, label)[:-1]


class _PlainMap:
    workers = 2

    def map(self, fn, jobs):  # noqa: ANN001, ANN201
        return [fn(j) for j in jobs]


class _NoWorkers:
    def map(self, fn, jobs, **kwargs):  # noqa: ANN001, ANN003, ANN201
        return [fn(j) for j in jobs]


def test_executor_objects_are_checked_before_and_after_their_map():
    with open_executor(SerialExecutor()) as ex:
        assert ex.map(lambda j: j * 2, [1, 2, 3]) == [2, 4, 6]
    with open_executor(_DropsLast()) as ex, pytest.raises(BitmixError, match="returned 2 results for 3 jobs"):
        ex.map(lambda j: j, [1, 2, 3])  # HAWQ scored every layer 0 from a short list
    with pytest.raises(BitmixError, match=r"_PlainMap.map must take map\(fn, jobs, describe=..., label=...\)"):
        open_executor(_PlainMap()).__enter__()  # refused on entering
    with pytest.raises(BitmixError, match="_NoWorkers needs an int `workers` >= 1 .*got None"):
        open_executor(_NoWorkers()).__enter__()


def test_a_ray_address_with_a_scheme_is_one_line():
    from bitmix.compiler.sensitivity.ray_executor import RayExecutor

    with pytest.raises(BitmixError, match=r"cannot join the Ray cluster at http://nonsense:8265"):
        open_executor(RayExecutor(address="http://nonsense:8265")).__enter__()
