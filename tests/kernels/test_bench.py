"""The kernel benchmark's records: what ran, against which baseline, from which bytes."""

from __future__ import annotations

import numpy as np
import pytest

from bitmix.kernels import bench, dispatch


@pytest.mark.parametrize("m", [1, 64])
def test_case_records_name_engine_and_baselines(m: int) -> None:
    recs = bench._bench_case(np.random.default_rng(0), m, 96, 1024, 4, "hot", 3, 30.0, with_qlinear=m == 1)
    ops = {"gemv", "qlinear"} if m == 1 else {"gemm"}
    baselines = ("torch_fp32", "torch_int8_dynamic")
    assert {(r["op"], r["baseline"]) for r in recs} == {(o, b) for o in ops for b in baselines}
    w = bench._random_packed(np.random.default_rng(0), 96, 1024, 4)
    amx = dispatch.settings.uses_amx(w, m, 1)
    for r in recs:
        assert r["engine"] == dispatch.settings.engine(w, m, 1)
        assert (r["engine"] == "amx") == amx and r["engine"] in ("amx", "avx512vnni", "avx2", "portable")
        assert r["weight_bytes"] == (96 * 1024 if amx else w.nbytes)


@pytest.mark.slow
def test_warm_cache_recompiles_nothing() -> None:
    res = bench.measure_cold_start([4], prefill=True)
    assert res["warm_cache"]["cache_misses"] == 0
    assert res["empty_cache"]["cache_misses"] > 0
