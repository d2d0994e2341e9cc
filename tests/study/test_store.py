"""The study store's run clock: an interrupted run's wall time still counts when the study is resumed."""

from __future__ import annotations

import json

import pytest

from bitmix.cli import main
from bitmix.study import sweep
from bitmix.study.store import RunClock, last_marks, read_jsonl


def test_last_marks_keeps_each_runs_longest_mark_and_untagged_rows():
    rows = [{"wall_s": 30.0},  # a run of a store written before runs were marked
            {"run": "a", "wall_s": 1.0}, {"run": "a", "wall_s": 5.0},
            {"run": "b", "wall_s": 2.0}, {"run": "a", "wall_s": 4.0}, {"wall_s": 7.0}]
    assert [r["wall_s"] for r in last_marks(rows)] == [30.0, 5.0, 2.0, 7.0]


def test_every_progress_line_marks_the_run(tmp_path):
    said = []
    clock = RunClock(tmp_path / "runs.jsonl", "fp")
    say = clock.marking(said.append)
    say("one")
    say("two")
    rows = read_jsonl(tmp_path / "runs.jsonl", "fp")
    assert said == ["one", "two"] and len(rows) == 2 and {r["run"] for r in rows} == {clock.run}
    assert 0 <= rows[0]["wall_s"] <= rows[1]["wall_s"]


def test_an_interrupted_run_counts_in_the_study_wall_time(tmp_path, monkeypatch):
    out = tmp_path / "study"
    args = ["study", "frontier", "digits-cnn-ptq", "--methods", "sqnr", "--seeds", "1", "--budgets", "1.0",
            "--workers", "1", "--additivity", "0", "--out", str(out)]

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(sweep, "additivity", interrupted)
        assert main(args) == 130  # Ctrl-C: the CLI's exit code for an interrupt
    marks = [json.loads(line) for line in (out / "digits-cnn-ptq" / "runs.jsonl").read_text().splitlines()]
    first = max(m["wall_s"] for m in marks)
    assert first > 0 and not any("finished" in m for m in marks)
    assert main(args) == 0
    result = json.loads((out / "digits-cnn-ptq" / "frontier.json").read_text())
    assert len(result["runs"]) == 2 and result["runs"][0]["wall_s"] == first
    assert result["study_wall_s"] == pytest.approx(first + result["runs"][1]["wall_s"])
    assert "finished" in result["runs"][1]
