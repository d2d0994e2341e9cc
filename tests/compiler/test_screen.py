from __future__ import annotations

from bitmix.compiler import screen
from bitmix.compiler.screen import screened_argmin


def test_few_rows_judge_every_candidate_on_all_rows_with_ties_to_the_first():
    calls: list[tuple[int, slice]] = []

    def error(i: int, rows: slice) -> float:
        calls.append((i, rows))
        return [3.0, 1.0, 2.0, 1.0, 5.0, 4.0][i]

    assert screened_argmin(6, error, screen.MIN_ROWS - 1) == 1
    assert all(rows == slice(None) for _, rows in calls) and len(calls) == 6


def test_many_rows_judge_only_the_best_screened_on_all_rows():
    """The screen's ranking picks the finalists; the full error decides among them (here the screen's best is not)."""
    screened = [9.0, 1.0, 2.0, 3.0, 4.0, 8.0, 7.0]
    full = [0.5, 6.0, 5.0, 1.0, 9.0, 0.1, 0.2]  # 0, 5 and 6 are better but screen outside the best KEEP
    calls: list[tuple[int, slice]] = []

    def error(i: int, rows: slice) -> float:
        calls.append((i, rows))
        return full[i] if rows == slice(None) else screened[i]

    assert screened_argmin(7, error, screen.MIN_ROWS) == 3
    assert sorted(i for i, rows in calls if rows == slice(None)) == [1, 2, 3, 4]
    assert [rows for _, rows in calls].count(slice(None, None, screen.EVERY)) == 7
