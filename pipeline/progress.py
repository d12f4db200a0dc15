"""Progress lines on the terminal for long steps (probing, evaluation): done/total, elapsed, time left.

One plain line every `every` seconds rather than a bar: it reads the same in a terminal, in `ray job logs` and in a
CI log, where redrawn bars turn into hundreds of lines.
"""

from __future__ import annotations

import time

PROGRESS_EVERY_S = 15.0


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: short enough for a progress line."""
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta(done: float, total: float, elapsed: float) -> str:
    """Time left at the rate so far; `?` before anything is done."""
    if done <= 0:
        return "?"
    return duration(elapsed * max(total - done, 0) / done)


class Progress:
    """Counts work done and prints `what: done/total unit, elapsed, ETA` at most every `every` seconds."""

    def __init__(self, what: str, total: int, unit: str, every: float = PROGRESS_EVERY_S) -> None:
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            print(self.line(now), flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.start
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit}, {duration(elapsed)} elapsed, "
            f"ETA {eta(self.done, self.total, elapsed)}"
        )
