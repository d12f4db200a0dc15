"""The index step probes every video once over Ray Data and reports the unusable ones with their reason."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.prepare import main
from pipeline.data.index import build_index, info_from_row, info_to_row, read_usable
from pipeline.data.manifest import write_manifest
from pipeline.data.video import probe
from tests.videos import H264_BFRAMES_LONG_GOP, VP9_WEBM, write_bad_videos, write_indexed_video


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


@pytest.mark.parametrize("spec", [H264_BFRAMES_LONG_GOP, replace(VP9_WEBM, pts_gap_every=5)])
def test_an_index_row_gives_back_the_probe(tmp_path: Path, spec) -> None:
    """Evenly spaced pts are stored as start + step, others in full; both come back exactly."""
    path = write_indexed_video(tmp_path / f"video.{'webm' if spec.codec == 'libvpx-vp9' else 'mp4'}", spec)
    info = probe(path)
    row = {"path": str(path), **info_to_row(info)}
    assert (row["pts"] == []) == (spec.pts_gap_every == 0)
    assert info_from_row(row) == info


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
