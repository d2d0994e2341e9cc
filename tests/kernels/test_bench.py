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



def test_rounds_time_contenders_in_turns_and_pair_their_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    """Contenders take one block each per round, in turns; a slow spell over a round slows both of its blocks,
    and each round's ratio is taken on its own (fake clock: every call costs its contender's cost times the
    round's slowdown)."""
    clock = [0.0]
    order: list[str] = []
    indices: dict[str, list[int]] = {"ours": [], "base": []}
    spell = [1.0, 3.0, 3.0, 1.0, 7.0]

    def contender(name: str, cost: float):
        def fn(i: int) -> None:
            indices[name].append(i)
            order.append(name)
            rnd = sum(a == "base" and b == "ours" for a, b in zip(order, order[1:], strict=False))
            clock[0] += cost * spell[rnd]
        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    per_round = bench._round_medians({"ours": contender("ours", 1.0), "base": contender("base", 2.0)}, repeats=20,
                                     warmup=3, rounds=5)
    assert per_round == {"ours": spell, "base": [2 * s for s in spell]}
    blocks = [order[0]] + [b for a, b in zip(order, order[1:], strict=False) if a != b]
    assert blocks == ["ours", "base"] * 5
    assert indices["ours"] == list(range(3 + 4 * 5 + 4))  # warm-ups included: cold cases keep rotating copies
    assert bench._paired(per_round["base"], per_round["ours"]) == (2.0, 2.0, 2.0)
