"""The demo dataset: deterministic, readable by the rest of the pipeline, and its classes are motions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.prepare import main
from pipeline.data.demo import MOTIONS, OUTLINE_REACH, make_demo_dataset, motion_path
from pipeline.data.manifest import read_label_map, read_manifest
from pipeline.data.video import probe

SMALL = {"videos_per_class": 5, "size": 32, "num_frames": 12}


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_same_bytes_and_the_manifests_read_back(tmp_path: Path) -> None:
    first = make_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    make_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")

    train, val = read_manifest(first.train_manifest), read_manifest(first.val_manifest)
    assert (train.num_rows, val.num_rows) == (8 * 4, 8 * 1)
    assert sorted(set(val.column("label").to_pylist())) == list(range(8))
    assert read_label_map(first.label_map) == list(MOTIONS)
    info = probe(train.column("path")[0].as_py(), check_last_frame=True)
    assert (info.codec, info.num_frames, info.width, info.height, info.fps) == ("h264", 12, 32, 32, 30.0)


def test_another_seed_gives_other_videos(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "a", seed=1, num_classes=2, videos_per_class=1, size=32, num_frames=8)
    make_demo_dataset(tmp_path / "b", seed=2, num_classes=2, videos_per_class=1, size=32, num_frames=8)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and a != b


@pytest.mark.parametrize("motion", MOTIONS)
def test_each_class_is_its_motion_and_stays_in_frame(motion: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        path = motion_path(motion, rng, size=80, num_frames=40)
        x, y = path.centre[:, 0], path.centre[:, 1]
        changes = {
            "x": np.sign(np.diff(x)),
            "y": np.sign(np.diff(y)),
            "radius": np.sign(np.diff(path.radius)),
            "angle": np.sign(np.diff(path.angle)),
        }
        expected = {
            "moving left": {"x": -1},
            "moving right": {"x": 1},
            "moving up": {"y": -1},
            "moving down": {"y": 1},
            "growing": {"radius": 1},
            "shrinking": {"radius": -1},
            "rotating clockwise": {"angle": 1},
            "rotating counter-clockwise": {"angle": -1},
        }[motion]
        for quantity, direction in changes.items():
            assert (direction == expected.get(quantity, 0)).all(), f"{motion}: {quantity}"
        reach = path.radius * OUTLINE_REACH
        assert (x - reach >= 0).all() and (x + reach <= 80).all() and (y - reach >= 0).all() and (y + reach <= 80).all()


def test_the_cli_writes_a_demo_dataset(tmp_path: Path) -> None:
    args = ["demo", "--out", str(tmp_path), "--seed", "5", "--classes", "2", "--videos-per-class", "2", "--size", "32"]
    assert main([*args, "--frames", "8"]) == 0
    assert (tmp_path / "train.csv").is_file() and (tmp_path / "labels.txt").read_text() == "moving left\nmoving right\n"
    assert main(["demo", "--out", str(tmp_path / "x"), "--classes", "9"]) == 2
