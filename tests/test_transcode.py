"""The re-encode job: one video (frames, timestamps, size, atomic writes, the record) and a manifest on Ray Data
(resume, a bad video, a changed manifest, a new manifest that trains)."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pytest
from videos import H264_BFRAMES_LONG_GOP, MPEG4_AVI, corrupt_keyframes, read_index, write_indexed_video

from jobs.prepare import main as prepare
from pipeline.data.index import build_index, read_usable
from pipeline.data.manifest import read_label_map, read_manifest, write_label_map
from pipeline.data.transcode import (
    EncodeSettings,
    output_size,
    read_record,
    source_record,
    transcode_manifest,
    transcode_video,
)
from pipeline.data.video import VideoDecodeError, decode_frames, probe
from pipeline.errors import ConfigError, DataError

MP4 = replace(H264_BFRAMES_LONG_GOP, width=128, height=96, num_frames=24)
AVI = replace(MPEG4_AVI, width=128, height=96, num_frames=24)
HALF = EncodeSettings(short_side=48, gop=8, crf=23, preset="veryfast", tune="")  # 128x96 -> 64x48, GOP 8


def _index_at_half_size(frame: np.ndarray) -> int:
    """The painted index of a frame scaled to half width: stretched back so its stripes are where they were."""
    return read_index(np.repeat(frame, 2, axis=1))


def _dataset(folder: Path) -> Path:
    """Four indexed videos (one an AVI, one in a subfolder), a text file posing as one, and a manifest of all five
    with class names, segments and a label map."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    for name, spec in (("a.mp4", MP4), ("sub/b.mp4", MP4), ("c.avi", AVI), ("d.mp4", replace(MP4, num_frames=30))):
        write_indexed_video(folder / name, spec)
    (folder / "bad.mp4").write_text("not a video\n" * 20)
    write_label_map(["left", "right"], folder / "labels.txt")
    _write_csv(folder / "train.csv", [("a.mp4", "left", 0.1, 0.5), ("sub/b.mp4", "right", "", "")])
    rows = [("c.avi", "left", "", ""), ("bad.mp4", "right", "", ""), ("d.mp4", "right", 0.2, "")]
    _write_csv(folder / "all.csv", [*_read_rows(folder / "train.csv"), *rows])
    return folder


def _write_csv(path: Path, rows: list[tuple]) -> None:
    path.write_text("path,label,start_sec,end_sec\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))


def _read_rows(path: Path) -> list[tuple]:
    return [tuple(line.split(",")) for line in path.read_text().splitlines()[1:]]


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.mp4"))}


def test_output_size_scales_down_to_even_sides_and_never_up():
    assert output_size(1920, 1080, 320) == (568, 320)
    assert output_size(1080, 1920, 320) == (320, 568)
    assert output_size(340, 256, 320) == (340, 256)
    assert output_size(341, 255, 320) == (340, 254)
    with pytest.raises(ConfigError, match="CRF"):
        EncodeSettings(short_side=320, gop=32, crf=60, preset="fast", tune="")


@pytest.mark.parametrize("spec, suffix", [(MP4, ".mp4"), (AVI, ".avi")])
def test_a_video_keeps_every_frame_its_rate_and_timestamps_at_the_new_size(tmp_path, spec, suffix):
    source = write_indexed_video(tmp_path / f"source{suffix}", spec)
    target = tmp_path / "out" / "video.mp4"
    written = transcode_video(str(source), target, HALF)
    old, new = probe(source), probe(target, check_last_frame=True)
    assert written == target.stat().st_size
    assert (new.width, new.height, new.codec) == (64, 48, "h264")
    assert new.num_frames == old.num_frames and new.fps == pytest.approx(old.fps, rel=1e-9)
    seconds = [float(pts * new.time_base) for pts in new.pts]
    assert seconds == pytest.approx([float(pts * old.time_base) for pts in old.pts], abs=1e-6)
    assert new.keyframes[0] == 0 and max(np.diff([*new.keyframes, new.num_frames])) <= HALF.gop
    wanted = [0, 5, 9, new.num_frames - 1]
    assert [_index_at_half_size(frame) for frame in decode_frames(target, wanted, new)] == wanted
    assert read_record(target) == source_record(str(source), HALF)
    assert [p.name for p in target.parent.iterdir()] == ["video.mp4"]  # no temporary file left


def test_a_video_that_fails_midway_leaves_no_output(tmp_path):
    source = corrupt_keyframes(write_indexed_video(tmp_path / "long.mp4", MP4), tmp_path / "corrupt.mp4", [-1])
    target = tmp_path / "out" / "corrupt.mp4"
    with pytest.raises(VideoDecodeError, match="re-encoding failed|frames decoded"):
        transcode_video(str(source), target, HALF)
    assert list(target.parent.iterdir()) == []


def test_the_record_names_source_and_settings(tmp_path):
    source = write_indexed_video(tmp_path / "a.mp4", MP4)
    record = source_record(str(source), HALF)
    assert record["source"] == str(source) and record["settings"]["gop"] == HALF.gop
    assert source_record(str(source), replace(HALF, crf=30)) != record
    os.utime(source, ns=(record["mtime_ns"] + 10**9, record["mtime_ns"] + 10**9))
    assert source_record(str(source), HALF) != record
    assert read_record(source) is None  # a video made elsewhere carries no record: never taken as finished


@pytest.fixture(scope="module")
def transcoded(tmp_path_factory, ray_session) -> tuple[Path, Path, str]:
    """The five-row manifest re-encoded once through the command line: (dataset folder, out folder, stdout)."""
    import contextlib
    import io

    data = _dataset(tmp_path_factory.mktemp("dataset"))
    out = data.parent / f"{data.name}_transcoded"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = prepare(["transcode", "--manifest", str(data / "all.csv"), "--out", str(out), "--short-side", "48",
                        "--gop", "8", "--preset", "veryfast"])  # fmt: skip
    assert code == 0
    return data, out, printed.getvalue()


def test_the_new_manifest_trains_at_the_new_size_and_leaves_out_the_bad_video(transcoded, tmp_path):
    data, out, printed = transcoded
    assert "re-encoded 4 of 5 videos (0 already done, 1 failed)" in printed and "bad.mp4" in printed
    assert (out / "all_failed.tsv").read_text().startswith(f"{data / 'bad.mp4'}\tnot a video")
    assert read_label_map(out / "labels.txt") == ["left", "right"]
    old, new = read_manifest(data / "all.csv"), read_manifest(out / "all.csv")
    assert new["label"].to_pylist() == [0, 1, 0, 1] == [old["label"][i].as_py() for i in (0, 1, 2, 4)]
    assert new["start_sec"].to_pylist() == [0.1, None, None, 0.2] and new["end_sec"].to_pylist()[0] == 0.5
    assert new["path"].to_pylist() == [str(out / "videos" / name) for name in ("a.mp4", "sub/b.mp4", "c.mp4", "d.mp4")]
    summary = build_index(out / "all.csv", tmp_path / "index.parquet")
    usable, _ = read_usable(summary.path)
    assert summary.usable == summary.total == 4
    for row in usable.to_pylist():
        assert (row["width"], row["height"]) == (64, 48)
        frames = decode_frames(row["path"], [0, row["num_frames"] - 1])
        assert [_index_at_half_size(frame) for frame in frames] == [0, row["num_frames"] - 1]


def test_a_rerun_keeps_finished_videos_and_redoes_unfinished_ones(tmp_path, ray_session):
    data, out = _dataset(tmp_path / "dataset"), tmp_path / "out"
    first = transcode_manifest(data / "train.csv", out, HALF)  # the "interrupted" run: only the first two rows
    assert (first.encoded, first.reused, first.failed) == (2, 0, [])
    done = _mtimes(out)
    (out / "videos" / "d.mp4").write_bytes((data / "d.mp4").read_bytes())  # in place, but made by no run
    (out / "videos" / ".c.mp4.0123.partial").write_bytes(b"half an encode")  # a temporary file of a killed run
    second = transcode_manifest(data / "all.csv", out, HALF)
    assert (second.videos, second.encoded, second.reused) == (5, 2, 2)
    assert second.failed == [(str(data / "bad.mp4"), second.failed[0][1])] and "not a video" in second.failed[0][1]
    assert {name: _mtimes(out)[name] for name in done} == done  # the finished ones were not redone
    assert read_record(out / "videos" / "d.mp4") == source_record(str(data / "d.mp4"), HALF)
    assert not list(out.rglob("*.partial"))
    assert second.rows_written == 4 and len(read_manifest(second.manifest)) == 4


def test_a_changed_manifest_redoes_changed_rows_and_other_settings_redo_all(tmp_path, ray_session):
    data, out = _dataset(tmp_path / "dataset"), tmp_path / "out"
    transcode_manifest(data / "all.csv", out, HALF)
    before = _mtimes(out)
    write_indexed_video(data / "a.mp4", replace(MP4, num_frames=20))  # the same path, other content
    shutil.copy(data / "d.mp4", data / "e.mp4")
    rows = [row if row[0] != "sub/b.mp4" else ("e.mp4", *row[1:]) for row in _read_rows(data / "all.csv")]
    _write_csv(data / "all.csv", rows)  # row 2 now points at a new video
    changed = transcode_manifest(data / "all.csv", out, HALF)
    assert (changed.encoded, changed.reused, len(changed.failed)) == (2, 2, 1)
    after = _mtimes(out)
    assert after["videos/c.mp4"] == before["videos/c.mp4"] and after["videos/d.mp4"] == before["videos/d.mp4"]
    assert after["videos/a.mp4"] != before["videos/a.mp4"] and probe(out / "videos" / "a.mp4").num_frames == 20
    assert read_manifest(changed.manifest)["path"][1].as_py() == str(out / "videos" / "e.mp4")
    other = transcode_manifest(data / "all.csv", out, replace(HALF, gop=4))
    assert (other.encoded, other.reused) == (4, 0)
    _write_csv(data / "all.csv", [("bad.mp4", "left", "", "")])  # a run that ends without a new manifest ...
    with pytest.raises(DataError, match="no video could be re-encoded"):
        transcode_manifest(data / "all.csv", out, HALF)
    assert not (out / "all.csv").exists()  # ... leaves none of an earlier run, whose rows may point at new files


def test_the_job_refuses_to_overwrite_its_input(tmp_path):
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    write_indexed_video(data / "videos" / "a.mp4", MP4)
    _write_csv(data / "train.csv", [("videos/a.mp4", 0, "", "")])
    assert prepare(["transcode", "--manifest", str(data / "train.csv"), "--out", str(data)]) == 3
    pa_csv.read_csv(data / "train.csv")  # intact
