"""Counting what the clip pipeline had to work around, readable by the trainer between epochs.

Ray Data tasks report to one named Ray actor: videos that failed to decode (skipped, never failing the job) and
clips of videos too short for them (indices clamped). Tasks wait for the report to land, so once an epoch's
iteration ends its counts are complete; the trainer diffs two snapshots to get one epoch's figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

NAMESPACE = "mvit_ray"
DEFAULT_COUNTER = "clip_pipeline_skips"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkipSnapshot:
    """Running totals: videos skipped (once per time it happened) and clips whose indices were clamped."""

    skipped: int = 0
    clamped: int = 0

    def __sub__(self, earlier: SkipSnapshot) -> SkipSnapshot:
        return SkipSnapshot(self.skipped - earlier.skipped, self.clamped - earlier.clamped)


@ray.remote(num_cpus=0)
class SkipCounter:
    """Totals of skipped videos and clamped clips, and the last reason each video was skipped."""

    def __init__(self) -> None:
        self._snapshot = SkipSnapshot()
        self._reasons: dict[str, str] = {}

    def report(self, skipped: list[tuple[str, str]], clamped: int) -> None:
        for path, reason in skipped:
            self._reasons[path] = reason
        self._snapshot = SkipSnapshot(self._snapshot.skipped + len(skipped), self._snapshot.clamped + clamped)

    def total(self) -> int:
        return self._snapshot.skipped

    def snapshot(self) -> SkipSnapshot:
        return self._snapshot

    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)


def skip_counter(name: str = DEFAULT_COUNTER) -> ray.actor.ActorHandle:
    """The counter called `name`, created on first use.

    Its owner is whoever creates it first (the driver that builds the datasets), and it lives as long as they do.
    Give concurrent runs on one cluster different names.
    """
    return SkipCounter.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()


def report(counter: ray.actor.ActorHandle, skipped: list[tuple[str, str]], clamped: int) -> None:
    """Log each skipped video on one line and add everything to the counter, waiting until it is counted."""
    for path, reason in skipped:
        logger.warning("skipped video %s: %s", path, reason)
    if skipped or clamped:
        ray.get(counter.report.remote(skipped, clamped))
