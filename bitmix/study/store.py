"""The study's resumable store: JSON lines tagged with the recipe fingerprint, appended as results land."""

from __future__ import annotations

import json
from pathlib import Path


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
                rows.append(row)
    return rows


def append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def assignment_key(assignment: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(assignment.items()))
