"""The study's resumable store: JSON lines tagged with the recipe fingerprint, appended as results land.

Assignments are stored as {layer: "w/a"} and scores as {layer: {"w/a": score}}; plain ints
(older stores) read as b/b.
"""

from __future__ import annotations

import json
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
