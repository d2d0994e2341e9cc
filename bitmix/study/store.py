"""The study's resumable store: JSON lines tagged with the recipe fingerprint, appended as results land.

Assignments are stored as {layer: "w/a"} and scores as {layer: {"w/a": score}}; plain ints
(older stores) read as b/b.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path

from bitmix.ir.precision import Precision, as_precision, format_assignment


def read_jsonl(path: Path, fingerprint: str) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupted run
                continue
            if row.get("recipe") == fingerprint:
                if isinstance(row.get("assignment"), dict):
                    row["assignment"] = read_assignment(row["assignment"])
                if isinstance(row.get("scores"), dict):
                    row["scores"] = {n: {as_precision(b): v for b, v in d.items()} for n, d in row["scores"].items()}
                rows.append(row)
    return rows


def append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        if isinstance(row.get("assignment"), dict):
            row = {**row, "assignment": format_assignment(row["assignment"])}
        if isinstance(row.get("scores"), dict):
            row = {**row, "scores": {n: {str(as_precision(b)): v for b, v in d.items()}
                                     for n, d in row["scores"].items()}}
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_assignment(assignment: dict) -> dict[str, Precision]:
    return {n: as_precision(b) for n, b in assignment.items()}


def assignment_key(assignment: dict) -> tuple[tuple[str, Precision], ...]:
    return tuple(sorted((n, as_precision(b)) for n, b in assignment.items()))


class RunClock:
    """This run's elapsed wall time, appended to ``runs.jsonl`` at every mark (one row per mark, tagged with the run's
    start), so a run that is interrupted still counts up to its last result when the study is resumed."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.run = datetime.datetime.now(datetime.UTC).isoformat()
        self.start = time.perf_counter()

    def mark(self, **extra: object) -> None:
        append(self.path, {"recipe": self.fingerprint, "run": self.run, "wall_s": time.perf_counter() - self.start,
                           **extra})

    def marking(self, say: Callable[[str], None]) -> Callable[[str], None]:
        """``say`` that also marks: every progress line is written when a result has landed."""
        def say_and_mark(message: str) -> None:
            say(message)
            self.mark()
        return say_and_mark


def last_marks(rows: list[dict]) -> list[dict]:
    """One row per run, its last (longest) mark, in order of the runs' first marks; rows without a run tag (written
    once, at a run's end) are runs of their own."""
    runs: dict[object, dict] = {}
    for i, row in enumerate(rows):
        key = row.get("run", i)
        if key not in runs or row["wall_s"] >= runs[key]["wall_s"]:
            runs[key] = row
    return list(runs.values())
