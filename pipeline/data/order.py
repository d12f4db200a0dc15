"""The order an epoch visits the videos in, drawn in O(N) where Ray Data plans each execution, and the epoch it is.

Ray Train runs a dataset anew every epoch, and every run of a Ray Dataset asks its datasource for read tasks.
`IndexSource` answers with a seeded permutation of the index (seed, epoch) cut into tasks of `videos_per_task` rows,
so an epoch costs a permutation of N row numbers and N / videos_per_task small task objects: no all-to-all shuffle.
Each row carries its `video_id` (its row in the usable index) and the `epoch`, from which the decode task seeds the
video's clip positions and crops (`clip_rng`): the same seed, epoch and video give the same clips, whichever task
or node decodes them. Which worker and batch a clip lands in still depends on task timing.

The epoch reaches the datasource through `EpochClock`, a small named actor that the training loop sets before it
iterates an epoch (Ray Data starts the epoch's run only when every worker has asked for it). An evaluation or a
benchmark passes a fixed epoch instead.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

NAMESPACE = "mvit_ray"
ORDER_STREAM, CLIP_STREAM = 0, 1  # independent random streams drawn from one seed

logger = logging.getLogger(__name__)


def epoch_permutation(num_videos: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the index rows in `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(num_videos)


def clip_rng(seed: int, epoch: int, video_id: int) -> np.random.Generator:
    """The random stream of one video's clips (positions, crops, flips) in one epoch."""
    return np.random.default_rng([seed, CLIP_STREAM, epoch, video_id])


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class EpochClock:
    """The epoch the training loop is in, for the datasource to read when Ray Data plans the epoch's run.

    Restarted by Ray if its process dies (it then knows no epoch until the next is set)."""

    def __init__(self) -> None:
        self._epoch: int | None = None

    def set(self, epoch: int) -> None:
        self._epoch = epoch

    def get(self) -> int | None:
        return self._epoch


def epoch_clock(name: str) -> ray.actor.ActorHandle:
    """The clock called `name`, created on first use (by the dataset built on the driver, which holds it)."""
    return EpochClock.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()


def set_epoch(name: str, epoch: int) -> None:
    """Tell the datasets of clock `name` which epoch comes next. A lost clock costs only the order: the datasets
    then repeat the order of the last epoch they drew (every video still once)."""
    try:
        ray.get(epoch_clock(name).set.remote(epoch))
    except ray.exceptions.RayActorError as error:
        logger.warning("epoch clock %s unreachable (%s); epoch %d repeats the last epoch's order", name, error, epoch)


@dataclass(frozen=True)
class EpochOrder:
    """The epoch, `epoch` when a number, read from the `EpochClock` of that name when a string; with `shuffle`, the
    rows in a permutation seeded by `seed` and the epoch, else in index order."""

    seed: int
    epoch: int | str
    shuffle: bool = True


class IndexSource(Datasource):
    """The rows of an index as read tasks of `videos_per_task` videos, in `order` (None: index order, epoch 0).

    The index goes to the object store once; each run of the dataset re-cuts it in the epoch's order.
    """

    def __init__(self, index: pa.Table, videos_per_task: int, order: EpochOrder | None) -> None:
        super().__init__()
        # One chunk a column: every part taken from a table of many small chunks (a concatenation of per-file
        # tables) would otherwise cost time and memory in proportion to the chunks, not to its rows.
        self._index = ray.put(index.combine_chunks())
        self._num_rows, self._nbytes = index.num_rows, index.nbytes
        self._videos_per_task = videos_per_task
        self._order = order
        # Held here: a named actor lives only while a handle to it does.
        self._clock = epoch_clock(order.epoch) if order is not None and isinstance(order.epoch, str) else None
        self._last_epoch = -1
        self._planned: tuple[int, list[ReadTask]] | None = None  # Ray Data plans a run twice; cut it once

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_planned": None}

    @property
    def num_tasks(self) -> int:
        return math.ceil(self._num_rows / self._videos_per_task)

    def estimate_inmemory_data_size(self) -> int:
        return self._nbytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        epoch = self._epoch()
        if self._planned is None or self._planned[0] != epoch:
            self._planned = (epoch, self._cut(epoch))
        self._last_epoch = epoch
        return self._planned[1]

    def _epoch(self) -> int:
        if self._order is None:
            return 0
        if self._clock is None:
            return self._order.epoch
        try:
            epoch = ray.get(self._clock.get.remote())
        except ray.exceptions.RayActorError as error:
            logger.warning("epoch clock %s unreachable (%s)", self._order.epoch, error)
            epoch = None
        return max(self._last_epoch, 0) if epoch is None else epoch

    def _cut(self, epoch: int) -> list[ReadTask]:
        shuffle = self._order is not None and self._order.shuffle
        parts = epoch_parts(ray.get(self._index), self._videos_per_task, self._order.seed if shuffle else None, epoch)
        return [ReadTask(functools.partial(_read, part), _metadata(part), schema=part.schema) for part in parts]


def epoch_parts(index: pa.Table, videos_per_task: int, seed: int | None, epoch: int) -> list[pa.Table]:
    """The index rows of `epoch` (in the permutation of (seed, epoch), or in index order when seed is None) in parts
    of `videos_per_task`, each with an `epoch` column.

    Each part is its own small table (taken, not sliced): a slice shares its parent's buffers and plain pickle
    writes them whole (ARROW-10739); Ray's serializer re-slices them at every serialization, a taken part needs no
    such work wherever it is pickled.
    """
    count = index.num_rows
    rows = epoch_permutation(count, seed, epoch) if seed is not None else np.arange(count)
    parts = []
    for start in range(0, count, videos_per_task):
        part = index.take(rows[start : start + videos_per_task])
        parts.append(part.append_column("epoch", pa.array(np.full(part.num_rows, epoch, dtype=np.int64))))
    return parts


def _read(part: pa.Table) -> list[pa.Table]:
    return [part]


def _metadata(part: pa.Table) -> BlockMetadata:
    return BlockMetadata(num_rows=part.num_rows, size_bytes=part.nbytes, input_files=None, exec_stats=None)
