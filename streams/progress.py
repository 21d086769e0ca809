"""Progress of long CLI work (replay, backfill): one line on stderr, redrawn in place."""

from __future__ import annotations

import sys
import time
from typing import IO, Final

PROGRESS_EVERY_S: Final[float] = 0.5
PROGRESS_BAR_WIDTH: Final[int] = 30


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most every PROGRESS_EVERY_S."""

    def __init__(self, label: str, out: IO[str] | None = None) -> None:
        self.label = label
        self.out = out or sys.stderr
        self.started = time.monotonic()
        self.drawn_at = 0.0

    def __call__(self, done: int, total: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.drawn_at < PROGRESS_EVERY_S:
            return
        self.drawn_at = now
        share = done / total if total else 1.0
        filled = int(share * PROGRESS_BAR_WIDTH)
        rate = done / max(now - self.started, 1e-9)
        bar = "#" * filled + "-" * (PROGRESS_BAR_WIDTH - filled)
        print(f"\r{self.label} [{bar}] {share:6.1%} {done}/{total} records {rate:,.0f}/s",
              end="\n" if final else "", file=self.out, flush=True)
