"""Counting what the clip pipeline had to work around, per epoch, readable by the trainer at each epoch's end.

Ray Data tasks report to named Ray actors (the shards below): videos that failed to decode (skipped, never failing
the job) and clips of videos too short for them (indices clamped), under the epoch their rows carry. A task waits
for its report to land, so once an epoch's iteration ends its counts are complete.

The same actors notice a decoder that kills its whole process (a segfault, the out-of-memory killer), which no
`except` can catch. Ray retries a task whose process died, under the same task id. Every attempt tells the actor
when it starts and when it ends; an attempt that started and never ended died. The first attempt of a task notes
nothing more, so that the actor sees two calls per task, not one per video. A retry is careful: before each video
it tells the actor which video it is decoding, so the next death is pinned on that video. A video that was being
decoded at two deaths is skipped and counted: it costs one video, never the epoch. One death is not enough: a
lost node or an OOM kill of a large neighbour also ends a task, and the video deserves another try. (A video that
crashes its decoder every time therefore ends three attempts: one unattributed, two attributed.) The next epoch's
tasks have new ids, so the video gets a fresh chance there.

The counter is one or more actors, its shards (`SkipCounters`): each task attempt talks to the one its task id
hashes to, so every attempt of a task (a retry keeps the id) meets the same shard, and the counts of an epoch are
the sum over the shards. One actor serves ~1,500 calls a second on a core here, and a decode slot (one task running
at a time, 16 videos each) sends about 1.25; so a shard per `SLOTS_PER_SHARD` decode slots keeps every shard under a
tenth of its capacity: 1 on a workstation, 4 for a cluster decoding 3,400 videos a second (BENCHMARKS.md, "The
skip-counter actor").

Losing a shard costs at most its counts: Ray restarts it (empty), and a task or trainer that cannot reach it logs a
warning and goes on.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any

import ray

NAMESPACE = "mvit_ray"
DEFAULT_COUNTER = "clip_pipeline_skips"
DEATHS_BEFORE_SKIP = 2
SLOTS_PER_SHARD = 100  # concurrent decode tasks per counter shard (see above)
PROCESS_DIED = "its decoding process died {} times while decoding it (a crash in the decoder, or killed for memory)"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkipSnapshot:
    """Counts: videos skipped (once per time it happened) and clips whose indices were clamped."""

    skipped: int = 0
    clamped: int = 0

    def __add__(self, other: SkipSnapshot) -> SkipSnapshot:
        return SkipSnapshot(self.skipped + other.skipped, self.clamped + other.clamped)

    def __sub__(self, earlier: SkipSnapshot) -> SkipSnapshot:
        return SkipSnapshot(self.skipped - earlier.skipped, self.clamped - earlier.clamped)


@ray.remote(num_cpus=0, max_restarts=-1)
class SkipCounter:
    """One shard of a counter (of `shards`): per-epoch counts of skipped videos and clamped clips, the last reason
    each video was skipped, and the task attempts under way (with the video of each careful one)."""

    def __init__(self, shards: int = 1) -> None:
        self._shards = shards
        self._counts: dict[int, SkipSnapshot] = {}
        self._reasons: dict[str, str] = {}
        self._running: dict[str, tuple[str, int] | None] = {}  # task id -> (video, pid) a careful attempt is on
        self._deaths: dict[str, dict[str, int]] = {}  # task id (one that died before) -> video -> deaths during it

    def start(self, task: str) -> dict[str, int] | None:
        """A task attempt begins. None: no attempt of this task has died. Else the deaths per video so far (empty
        when the attempt that died had noted no video): the attempt is careful and notes each video."""
        if task in self._running:
            noted = self._running.pop(task)
            deaths = self._deaths.setdefault(task, {})
            if noted is not None:
                deaths[noted[0]] = deaths.get(noted[0], 0) + 1
        self._running[task] = None
        return dict(self._deaths[task]) if task in self._deaths else None

    def decoding(self, task: str, path: str, pid: int) -> None:
        self._running[task] = (path, pid)

    def report(self, task: str, epoch: int, skipped: list[tuple[str, str]], clamped: int) -> None:
        """A task attempt ends: its counts land under `epoch`, and it is no longer under way."""
        self._running.pop(task, None)
        for path, reason in skipped:
            self._reasons[path] = reason
        self._counts[epoch] = self.counts(epoch) + SkipSnapshot(len(skipped), clamped)

    def counts(self, epoch: int) -> SkipSnapshot:
        return self._counts.get(epoch, SkipSnapshot())

    def shards(self) -> int:
        """How many shards the counter has (a restarted shard keeps the number it was made with)."""
        return self._shards

    def totals(self) -> SkipSnapshot:
        return sum(self._counts.values(), SkipSnapshot())

    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)


class SkipCounters:
    """The shard actors of one counter, named `name/0`, `name/1`, ...: a task's calls go to the shard of its id,
    and what is read back is summed (or merged) over the shards. The first shard knows how many there are, so
    whoever asks for the counter by name later meets the same shards.

    `create`: make missing shards (with `shards` of them if the first is new), else only find them (a ValueError
    when one is gone)."""

    def __init__(self, name: str, shards: int = 1, *, create: bool = True) -> None:
        shard = _shard if create else _existing_shard
        first = shard(name, 0, shards)
        count = ray.get(first.shards.remote())
        self.shards = [first] + [shard(name, number, count) for number in range(1, count)]

    def for_task(self, task: str) -> ray.actor.ActorHandle:
        """The shard every attempt of `task` talks to (a stable hash: Python's `hash` differs between processes)."""
        return self.shards[zlib.crc32(task.encode()) % len(self.shards)]

    def counts(self, epoch: int) -> SkipSnapshot:
        return sum(ray.get([shard.counts.remote(epoch) for shard in self.shards]), SkipSnapshot())

    def totals(self) -> SkipSnapshot:
        return sum(ray.get([shard.totals.remote() for shard in self.shards]), SkipSnapshot())

    def reasons(self) -> dict[str, str]:
        parts = ray.get([shard.reasons.remote() for shard in self.shards])
        return {path: reason for part in parts for path, reason in part.items()}

    def close(self) -> None:
        """End the shards now, rather than when the last holder lets them go."""
        for shard in self.shards:
            ray.kill(shard)


def _shard(name: str, number: int, shards: int) -> ray.actor.ActorHandle:
    return SkipCounter.options(name=f"{name}/{number}", namespace=NAMESPACE, get_if_exists=True).remote(shards)


def _existing_shard(name: str, number: int, shards: int) -> ray.actor.ActorHandle:
    return ray.get_actor(f"{name}/{number}", namespace=NAMESPACE)


def skip_counter(name: str = DEFAULT_COUNTER, decode_slots: int = 1) -> SkipCounters:
    """The counter called `name`, created on first use with a shard per `SLOTS_PER_SHARD` of `decode_slots` (the
    decode tasks that may run at once); an existing counter keeps its shards.

    Its owner is whoever creates it first (the driver that builds the datasets), and it lives as long as that owner
    holds it. Give concurrent runs on one cluster different names.
    """
    return SkipCounters(name, max(1, math.ceil(decode_slots / SLOTS_PER_SHARD)))


def decode_slots(concurrency: int | None, cpus_per_task: float) -> int:
    """How many decode tasks may run at once: the cap, or as many as the cluster's CPUs fit."""
    if concurrency is not None:
        return concurrency
    return max(1, int(ray.cluster_resources().get("CPU", 1) / cpus_per_task)) if cpus_per_task > 0 else 1


def epoch_counts(name: str, epoch: int) -> SkipSnapshot | None:
    """What the tasks of `epoch` skipped and clamped, or None when a shard can't be reached (its counts lost)."""
    return _answer(lambda: SkipCounters(name, create=False).counts(epoch), f"skip counter {name}")


def _answer(call: Any, what: str) -> Any:
    """call(), or None (logged) when an actor is gone or restarting: the pipeline goes on without it."""
    try:
        return call()
    except (ray.exceptions.RayActorError, ValueError) as error:  # ValueError: no actor of that name
        logger.warning("%s unreachable, its counts are lost: %s", what, error)
        return None


class CrashGuard:
    """One attempt of a decode task, as the counter sees it: which videos to skip, which one is in progress (in a
    careful attempt), and what the attempt skipped and clamped."""

    def __init__(self, counters: SkipCounters) -> None:
        self.task = ray.get_runtime_context().get_task_id()
        self.counter = counters.for_task(self.task)
        self.deaths: dict[str, int] | None = _answer(
            lambda: ray.get(self.counter.start.remote(self.task)), "skip counter"
        )

    def should_skip(self, path: str) -> str | None:
        """The skip reason if `path` killed its decoding process too often, else None."""
        deaths = (self.deaths or {}).get(path, 0)
        return PROCESS_DIED.format(deaths) if deaths >= DEATHS_BEFORE_SKIP else None

    def decoding(self, path: str) -> None:
        """In a careful attempt, record that `path` is in progress before decoding it (waits: a crash may follow)."""
        if self.deaths is not None:
            _answer(lambda: ray.get(self.counter.decoding.remote(self.task, path, os.getpid())), "skip counter")

    def finish(self, epoch: int, skipped: list[tuple[str, str]], clamped: int) -> None:
        """Log each skipped video on one line and add everything to the counter, waiting until it is counted."""
        for path, reason in skipped:
            logger.warning("skipped video %s: %s", path, reason)
        _answer(lambda: ray.get(self.counter.report.remote(self.task, epoch, skipped, clamped)), "skip counter")
