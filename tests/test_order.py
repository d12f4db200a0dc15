"""An epoch's parts of the index, as the datasource cuts them for Ray Data's read tasks: every video once, in the
seeded order, and each part small enough to ship (no Ray needed)."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa

from pipeline.data.order import epoch_parts, epoch_permutation

ROWS = 20_000


def kinetics_like_index() -> pa.Table:
    """One table (one chunk, as a read Parquet file or a `take` gives) of rows as wide as a probed 10 s video's."""
    keyframes = list(range(0, 300, 30))
    rows = [
        {"path": f"s3://bucket/k400/train/{number:06d}.mp4", "label": number % 400, "keyframes": keyframes}
        for number in range(ROWS)
    ]
    return pa.Table.from_pylist(rows).combine_chunks()


def test_each_part_carries_only_its_rows() -> None:
    """A slice would pickle its parent's buffers whole (ARROW-10739), unless a serializer re-slices them."""
    index = kinetics_like_index()
    parts = epoch_parts(index, 16, seed=0, epoch=3)
    assert len(parts) == ROWS // 16 and all(part.num_rows == 16 for part in parts)
    whole = len(pickle.dumps(index))
    largest = max(len(pickle.dumps(part)) for part in parts[:50])
    assert largest * 100 < whole, (largest, whole)


def test_every_video_once_in_the_seeded_order_with_its_epoch() -> None:
    index = kinetics_like_index()
    parts = epoch_parts(index, 16, seed=7, epoch=2)
    paths = [path for part in parts for path in part.column("path").to_pylist()]
    expected = np.asarray(index.column("path").to_pylist())[epoch_permutation(ROWS, 7, 2)]
    assert paths == expected.tolist() and len(set(paths)) == ROWS
    assert {epoch for part in parts for epoch in part.column("epoch").to_pylist()} == {2}
    in_order = epoch_parts(index.slice(0, 40), 16, seed=None, epoch=0)  # validation: index order, a short last part
    assert [part.num_rows for part in in_order] == [16, 16, 8]
    first_40 = index.column("path").to_pylist()[:40]
    assert [path for part in in_order for path in part.column("path").to_pylist()] == first_40
