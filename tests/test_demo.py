"""The demo dataset: deterministic, readable by the rest of the pipeline, and its classes are motions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.prepare import main
from pipeline.config import load_config, typed
from pipeline.data.demo import (
    DEMO_VERSION,
    MOTIONS,
    REACH,
    SETTINGS_FILE,
    DemoSettings,
    demo_settings,
    make_demo_dataset,
    motion_path,
)
from pipeline.data.manifest import read_label_map, read_manifest
from pipeline.data.video import probe
from pipeline.training.driver import use_demo_if_unset

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
    videos = [
        {path.split("/", 2)[2]: data for path, data in files.items() if path.endswith(".mp4")} for files in (a, b)
    ]
    assert videos[0].keys() == videos[1].keys() and videos[0] != videos[1]  # videos/v3-seedN/<motion>/<number>.mp4


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
        }
        expected = {
            "moving left": {"x": -1},
            "moving right": {"x": 1},
            "moving up": {"y": -1},
            "moving down": {"y": 1},
            "moving up-right": {"x": 1, "y": -1},
            "moving down-left": {"x": -1, "y": 1},
            "growing": {"radius": 1},
            "shrinking": {"radius": -1},
        }[motion]
        for quantity, direction in changes.items():
            assert (direction == expected.get(quantity, 0)).all(), f"{motion}: {quantity}"
        if motion.startswith("moving up-") or motion.startswith("moving down-"):
            assert np.allclose(np.abs(np.diff(x)), np.abs(np.diff(y))), f"{motion}: not at 45°"
        reach = path.radius * REACH
        assert (x - reach >= 0).all() and (x + reach <= 80).all() and (y - reach >= 0).all() and (y + reach <= 80).all()


def test_the_cli_writes_a_demo_dataset(tmp_path: Path) -> None:
    args = ["demo", "--out", str(tmp_path), "--seed", "5", "--classes", "2", "--videos-per-class", "2", "--size", "32"]
    assert main([*args, "--frames", "8"]) == 0
    assert (tmp_path / "train.csv").is_file() and (tmp_path / "labels.txt").read_text() == "moving left\nmoving right\n"
    assert main(["demo", "--out", str(tmp_path / "x"), "--classes", "9"]) == 2


def test_a_demo_folder_of_another_version_or_seed_is_made_again(tmp_path: Path, capsys) -> None:
    """`python -m jobs.train` with no data reuses `data.demo.out` only when its `demo.json` matches what is asked;
    a folder of an older version (version 1 wrote no `demo.json`) or of another seed is made again, at new manifest
    paths, so that no index cached for the old videos is reused."""
    out = tmp_path / "demo"
    settings = [f"data.demo.out={out}", "data.demo.videos_per_class=1"]
    make_demo_dataset(out, seed=0, videos_per_class=1, size=32, num_frames=8)
    (out / SETTINGS_FILE).unlink()  # as an older version left it
    data = typed(load_config(None, settings)).data
    use_demo_if_unset(data)
    assert "making the demo dataset in" in capsys.readouterr().out
    assert demo_settings(out) == DemoSettings(DEMO_VERSION, 0, 8, 1, 80, 40, 30, 0.2)
    first_paths = set(read_manifest(data.train).column("path").to_pylist())
    assert all(f"/videos/v{DEMO_VERSION}-seed0/" in path for path in first_paths)
    again = typed(load_config(None, settings)).data
    use_demo_if_unset(again)
    assert capsys.readouterr().out == "" and again.train == data.train  # the same settings: reused
    other_seed = typed(load_config(None, [*settings, "data.demo.seed=1"])).data
    use_demo_if_unset(other_seed)
    assert "making the demo dataset in" in capsys.readouterr().out and demo_settings(out).seed == 1
    assert not set(read_manifest(other_seed.train).column("path").to_pylist()) & first_paths
