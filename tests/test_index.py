"""The index step probes every video once over Ray Data and reports the unusable ones with their reason."""

from __future__ import annotations

import os
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.prepare import main
from pipeline.data.index import (
    build_index,
    compact_pts,
    ensure_index,
    expand_pts,
    info_from_row,
    info_to_row,
    read_usable,
)
from pipeline.data.manifest import ManifestError, write_manifest
from pipeline.data.video import probe
from pipeline.errors import DataError
from tests.videos import H264_BFRAMES_LONG_GOP, VP9_WEBM, VideoSpec, write_bad_videos, write_indexed_video


@pytest.fixture(scope="module")
def mixed_manifest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict[str, tuple[Path, str]]]:
    """A manifest of two good videos and every kind of bad one, with relative paths."""
    folder = tmp_path_factory.mktemp("mixed")
    good = [
        write_indexed_video(folder / "good.mp4", H264_BFRAMES_LONG_GOP),
        write_indexed_video(folder / "good.webm", VP9_WEBM),
    ]
    bad = write_bad_videos(folder / "bad")
    paths = [good[0], *(path for path, _ in bad.values()), good[1]]
    table = pa.table(
        {
            "path": [str(path.relative_to(folder)) for path in paths],
            "label": pa.array([number % 2 for number in range(len(paths))], pa.int64()),
        }
    )
    write_manifest(table, folder / "manifest.csv")
    return folder / "manifest.csv", good, bad


@pytest.mark.faults
def test_build_index_keeps_order_and_reports_each_unusable_video(ray_session, mixed_manifest, tmp_path: Path) -> None:
    manifest, good, bad = mixed_manifest
    summary = build_index(manifest, tmp_path / "index.parquet", videos_per_task=2)
    assert (summary.total, summary.usable) == (len(bad) + 2, 2)
    reasons = dict(summary.unusable)
    for path, word in bad.values():
        assert word in reasons[str(path)]

    index = pq.read_table(summary.path)
    assert index.column("path").to_pylist()[0] == str(good[0]) and index.column("path").to_pylist()[-1] == str(good[1])
    promised = {"status", "num_frames", "fps", "duration", "width", "height", "codec", "keyframes"}
    assert promised <= set(index.column_names)
    usable, excluded = read_usable(summary.path)
    assert usable.column("path").to_pylist() == [str(path) for path in good]
    assert excluded == summary.unusable
    first = usable.to_pylist()[0]
    assert (first["num_frames"], first["keyframes"], first["codec"], first["label"]) == (100, [0, 40, 80], "h264", 0)


@pytest.mark.parametrize("spec", [H264_BFRAMES_LONG_GOP, VP9_WEBM, replace(VP9_WEBM, pts_gap_every=5)])
def test_an_index_row_gives_back_the_probe(tmp_path: Path, spec) -> None:
    """Evenly spaced pts are stored as start + step (WebM's 1 ms time base rounds 30 fps to 33, 33, 34 ms: a step of
    100/3), others in full; both come back exactly."""
    path = write_indexed_video(tmp_path / f"video.{'webm' if spec.codec == 'libvpx-vp9' else 'mp4'}", spec)
    info = probe(path)
    row = {"path": str(path), **info_to_row(info)}
    assert (row["pts"] == []) == (spec.pts_gap_every == 0)
    assert info_from_row(row) == info


def test_timestamps_rounded_into_a_time_base_are_stored_as_a_fractional_step() -> None:
    ntsc_in_ms = tuple((2 * i * 1001 + 30) // 60 for i in range(9000))  # 29.97 fps in 1 ms: 0, 33, 67, 100, 133, 167
    assert compact_pts(ntsc_in_ms, 30000 / 1001, Fraction(1, 1000)) == (0, 1001, 30, [])
    assert compact_pts(ntsc_in_ms[:2000], 0.0, Fraction(1, 1000))[1:3] == (1001, 30)  # from long pts alone
    assert expand_pts(0, 1001, 30, 9000) == ntsc_in_ms
    jittered = ntsc_in_ms[:100] + tuple(value + 1 for value in ntsc_in_ms[100:200])
    assert compact_pts(jittered, 30000 / 1001, Fraction(1, 1000)) == (0, 0, 1, list(jittered))


def test_a_format_2_index_row_reads_as_whole_steps(tmp_path: Path) -> None:
    """Indexes probed before fractional steps (format 2, no `pts_step_den`) are read, not refused."""
    path = write_indexed_video(tmp_path / "video.mp4", H264_BFRAMES_LONG_GOP)
    info = probe(path)
    row = {"path": str(path), **info_to_row(info), "probe_format": 2}
    del row["pts_step_den"]
    table = pa.Table.from_pylist([row])
    usable, _ = read_usable(table)
    assert info_from_row(usable.to_pylist()[0]) == info
    with pytest.raises(DataError, match="probe format 1, this version reads 2 and 3"):
        read_usable(table.drop_columns(["probe_format"]))


@pytest.mark.faults
def test_the_cli_indexes_and_lists_what_it_left_out(ray_session, mixed_manifest, tmp_path: Path, capsys) -> None:
    manifest, _, bad = mixed_manifest
    assert main(["index", "--manifest", str(manifest), "--out", str(tmp_path / "index.parquet")]) == 0
    out = capsys.readouterr().out
    assert f"2 usable, {len(bad)} left out" in out
    assert out.count("  left out ") == len(bad)


@pytest.mark.faults
def test_the_cli_refuses_a_path_outside_the_root_in_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "manifest.csv").write_text("path,label\nvideos/a.mp4,0\n/etc/hosts,0\n")
    assert main(["index", "--manifest", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "i.parquet")]) == 3
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "row 2 path '/etc/hosts' is outside the root" in error


def _probes(cache: Path) -> set[str]:
    return {path.name for path in cache.glob("*.parquet")}


def test_the_index_cache_is_keyed_by_what_was_probed(ray_session, tmp_path: Path) -> None:
    """A manifest edited in place (and older than the cache) is probed again; other roots or label maps never
    reuse another input's index; the same inputs do."""
    first, second = (write_indexed_video(tmp_path / name, VideoSpec(num_frames=12)) for name in ("a.mp4", "b.mp4"))
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    manifest, cache = tmp_path / "train.csv", tmp_path / "cache"
    manifest.write_text("path,label\na.mp4,cat\n")

    def probed(root=None, labels=None) -> list[str]:
        found = ensure_index(str(manifest), cache, root, False, labels, 1.0, None)
        return pq.read_table(found).column("path").to_pylist()

    assert probed() == [str(first)]
    manifest.write_text("path,label\nb.mp4,dog\n")
    os.utime(manifest, (0, 0))  # older than the cached index: an mtime check would trust the cache
    assert probed() == [str(second)]
    assert len(_probes(cache)) == 2
    assert probed() == [str(second)] and len(_probes(cache)) == 2  # the same inputs: the cached index
    (tmp_path / "swapped.txt").write_text("dog\ncat\n")
    assert probed(labels=str(tmp_path / "swapped.txt")) == [str(second)] and len(_probes(cache)) == 3
    assert probed(root=str(tmp_path)) == [str(second)] and len(_probes(cache)) == 4


def test_an_index_is_held_to_the_root_like_a_manifest(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "v.mp4"
    index = tmp_path / "data" / "train_index.parquet"
    index.parent.mkdir()
    pq.write_table(pa.table({"path": [str(outside)], "label": [0], "status": ["ok"]}), index)
    with pytest.raises(ManifestError, match="row 1 path .* is outside the root"):
        ensure_index(str(index), tmp_path / "cache", None, False, None, 1.0, None)
    with pytest.raises(ManifestError, match="outside the root"):
        ensure_index(str(index), tmp_path / "cache", str(tmp_path / "data"), False, None, 1.0, None)
    assert ensure_index(str(index), tmp_path / "cache", None, True, None, 1.0, None) == str(index)
    assert ensure_index(str(index), tmp_path / "cache", str(tmp_path), False, None, 1.0, None) == str(index)


def test_an_index_of_nothing_usable_is_an_error_naming_the_reasons(ray_session, tmp_path: Path, capsys) -> None:
    (tmp_path / "manifest.csv").write_text("path,label\ngone.mp4,0\nnot_a_video.mp4,0\n")
    (tmp_path / "not_a_video.mp4").write_text("hello")
    out = tmp_path / "index.parquet"
    assert main(["index", "--manifest", str(tmp_path / "manifest.csv"), "--out", str(out)]) == 3
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "none of its 2 videos is usable" in error
    assert "gone.mp4" in error and "not_a_video.mp4" in error and out.is_file()
