"""Progress bars for long loops (fine-tuning epochs), shown only to a person at a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator


def progress_enabled() -> bool:
    """Progress bars only for a human at a terminal, and never under BITMIX_QUIET=1."""
    return os.environ.get("BITMIX_QUIET", "") != "1" and sys.stderr.isatty()


def limit(it: Iterator, n: int) -> Iterator:
    for i, item in enumerate(it):
        if i >= n:
            return
        yield item


class progress:
    """`with progress(total, label) as advance:` a rich bar over epochs (or a no-op)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.bar = None

    def __enter__(self):
        if not progress_enabled():
            return lambda: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
