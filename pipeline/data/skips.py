"""Counting what the clip pipeline had to work around, readable by the trainer between epochs.

Ray Data tasks report to one named Ray actor: videos that failed to decode (skipped, never failing the job) and
clips of videos too short for them (indices clamped). Tasks wait for the report to land, so once an epoch's
iteration ends its counts are complete; the trainer diffs the totals at two epoch ends to get one epoch's figures.

The same actor notices a decoder that kills its whole process (a segfault, the out-of-memory killer), which no
`except` can catch: before each video a task tells the actor which video it is decoding. Ray retries a task whose
process died, under the same task id; the retry learns which video was in progress when the last attempt died.
A video that was in progress at two deaths is skipped and counted, so it costs one video, never the epoch. One
death is not enough: a lost node or an OOM kill of a large neighbour also ends a task, and the video deserves
another try. The next epoch's tasks have new ids, so the video gets a fresh chance there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

NAMESPACE = "mvit_ray"
DEFAULT_COUNTER = "clip_pipeline_skips"
DEATHS_BEFORE_SKIP = 2
PROCESS_DIED = "its decoding process died {} times while decoding it (a crash in the decoder, or killed for memory)"

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
    """Totals of skipped videos and clamped clips, the last reason each video was skipped, and the video each
    running decode task is on."""

    def __init__(self) -> None:
        self._snapshot = SkipSnapshot()
        self._reasons: dict[str, str] = {}
        self._decoding: dict[str, tuple[str, int]] = {}  # task id -> (video, pid) being decoded now
        self._deaths: dict[str, dict[str, int]] = {}  # task id -> video -> process deaths while decoding it

    def start(self, task: str) -> dict[str, int]:
        """A task attempt begins: the videos of this task that were in progress when earlier attempts died."""
        if task in self._decoding:
            path, _ = self._decoding.pop(task)
            deaths = self._deaths.setdefault(task, {})
            deaths[path] = deaths.get(path, 0) + 1
        return dict(self._deaths.get(task, {}))

    def decoding(self, task: str, path: str, pid: int) -> None:
        self._decoding[task] = (path, pid)

    def report(self, task: str, skipped: list[tuple[str, str]], clamped: int) -> None:
        """A task attempt ends: its counts land, and its in-progress marker is cleared."""
        self._decoding.pop(task, None)
        for path, reason in skipped:
            self._reasons[path] = reason
        self._snapshot = SkipSnapshot(self._snapshot.skipped + len(skipped), self._snapshot.clamped + clamped)

    def totals(self) -> SkipSnapshot:
        return self._snapshot

    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)


def skip_counter(name: str = DEFAULT_COUNTER) -> ray.actor.ActorHandle:
    """The counter called `name`, created on first use.

    Its owner is whoever creates it first (the driver that builds the datasets), and it lives as long as they do.
    Give concurrent runs on one cluster different names.
    """
    return SkipCounter.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()


class CrashGuard:
    """One attempt of a decode task, as the counter sees it: which videos to skip, which one is in progress, and
    what the attempt skipped and clamped."""

    def __init__(self, counter: ray.actor.ActorHandle) -> None:
        self.counter = counter
        self.task = ray.get_runtime_context().get_task_id()
        self.deaths = ray.get(counter.start.remote(self.task))

    def should_skip(self, path: str) -> str | None:
        """The skip reason if `path` killed its decoding process too often, else None."""
        deaths = self.deaths.get(path, 0)
        return PROCESS_DIED.format(deaths) if deaths >= DEATHS_BEFORE_SKIP else None

    def decoding(self, path: str) -> None:
        """Record, before decoding `path`, that it is in progress (waits: a crash may follow at once)."""
        ray.get(self.counter.decoding.remote(self.task, path, os.getpid()))

    def finish(self, skipped: list[tuple[str, str]], clamped: int) -> None:
        """Log each skipped video on one line and add everything to the counter, waiting until it is counted."""
        for path, reason in skipped:
            logger.warning("skipped video %s: %s", path, reason)
        ray.get(self.counter.report.remote(self.task, skipped, clamped))
