"""Manifests and label maps: round trips, path resolution, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.data.manifest import (
    ManifestError,
    label_map_path,
    read_label_map,
    read_manifest,
    write_label_map,
    write_manifest,
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_round_trip_resolves_relative_paths_against_the_manifest_folder(tmp_path: Path, suffix: str) -> None:
    table = pa.table(
        {
            "path": ["a/one.mp4", "two.mp4"],
            "label": pa.array([1, 0], pa.int64()),
            "start_sec": [0.5, None],
            "end_sec": [2.0, None],
        }
    )
    manifest = tmp_path / f"train{suffix}"
    write_manifest(table, manifest)
    read = read_manifest(manifest)
    assert read.column("path").to_pylist() == [str(tmp_path / "a/one.mp4"), str(tmp_path / "two.mp4")]
    assert read.column("label").type == pa.int64() and read.column("label").to_pylist() == [1, 0]
    assert read.column("start_sec").to_pylist() == [0.5, None]
    assert read.column("end_sec").to_pylist() == [2.0, None]


@pytest.mark.faults
def test_a_configured_root_and_label_names(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "lists/val.csv", "path,label\nx/v.mp4,dog\n/data/abs.mp4,cat\n")
    write_label_map(["cat", "dog"], label_map_path(manifest))
    with pytest.raises(ManifestError, match="outside the root"):
        read_manifest(manifest, root="/videos")
    read = read_manifest(manifest, root="/videos", allow_outside_root=True)
    assert read.column("path").to_pylist() == ["/videos/x/v.mp4", "/data/abs.mp4"]
    assert read.column("label").to_pylist() == [1, 0]
    assert read.column_names == ["path", "label"]


@pytest.mark.faults
def test_a_path_that_climbs_out_of_the_root_is_refused(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.csv", "path,label\nok.mp4,0\n../../etc/passwd,0\n")
    with pytest.raises(ManifestError, match=r"row 2 path '\.\./\.\./etc/passwd' is outside the root"):
        read_manifest(manifest)
    assert len(read_manifest(manifest, allow_outside_root=True)) == 2


@pytest.mark.faults
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,label\n", "empty"),
        ("path,class\nv.mp4,0\n", "wrong columns"),
        ("path,label,start\nv.mp4,0,1\n", "wrong columns"),
        ("path,label\nv.mp4,7\n", "row 1 has unknown label 7"),
        ("path,label\nv.mp4,0\nw.mp4,horse\n", "row 2 has unknown label 'horse'"),
        ("path,label\nv.mp4,0\n,1\n", "row 2 has no path"),
        ("path,label\nv.mp4,\n", "row 1 has no label"),
        ("path,label,start_sec,end_sec\nv.mp4,0,3,2\n", "row 1 has start_sec not before end_sec"),
        ("path,label,start_sec\nv.mp4,0,-1\n", "must not be negative"),
    ],
)
def test_bad_manifests_give_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    manifest = _write(tmp_path / "m.csv", text)
    write_label_map(["cat", "dog"], tmp_path / "labels.txt")
    with pytest.raises(ManifestError, match=message) as raised:
        read_manifest(manifest)
    assert "\n" not in str(raised.value) and str(manifest) in str(raised.value)


@pytest.mark.faults
def test_names_need_a_label_map_and_the_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="there is no"):
        read_manifest(_write(tmp_path / "m.csv", "path,label\nv.mp4,cat\n"))
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "absent.csv")
    with pytest.raises(ManifestError, match=".parquet or .csv"):
        read_manifest(_write(tmp_path / "m.json", "{}"))


def test_label_map_round_trip_and_errors(tmp_path: Path) -> None:
    names = ["abseiling", "passing American football (in game)", "zumba"]
    write_label_map(names, tmp_path / "labels.txt")
    assert read_label_map(tmp_path / "labels.txt") == names
    assert (tmp_path / "labels.txt").read_text().splitlines()[1] == names[1]
    with pytest.raises(ManifestError, match="appears twice"):
        write_label_map(["a", "b", "a"], tmp_path / "dup.txt")
    with pytest.raises(ManifestError, match="not found"):
        read_label_map(tmp_path / "none.txt")
    with pytest.raises(ManifestError, match="non-empty"):
        read_label_map(_write(tmp_path / "gap.txt", "a\n\nb\n"))


def test_text_labels_may_mix_names_and_indices(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.csv", "path,label\nv.mp4,1\nw.mp4,cat\n")
    write_label_map(["cat", "dog"], tmp_path / "labels.txt")
    assert read_manifest(manifest).column("label").to_pylist() == [1, 0]


def test_the_run_label_map_resolves_the_names_not_the_one_beside_the_manifest(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.csv", "path,label\nv.mp4,cat\nw.mp4,dog\n")
    write_label_map(["cat", "dog"], label_map_path(manifest))
    run_labels = tmp_path / "run" / "labels.txt"
    write_label_map(["dog", "cat", "cow"], run_labels)
    assert read_manifest(manifest).column("label").to_pylist() == [0, 1]
    assert read_manifest(manifest, labels=run_labels).column("label").to_pylist() == [1, 0]
    write_label_map(["dog"], run_labels)
    with pytest.raises(ManifestError, match=rf"row 1 has unknown label 'cat' \(not in the label map {run_labels}\)"):
        read_manifest(manifest, labels=run_labels)
    with pytest.raises(ManifestError, match="label map not found"):
        read_manifest(manifest, labels=tmp_path / "absent.txt")


def _fault(name: str, **figures: int) -> None:
    print(f"FAULT {name}: " + " ".join(f"{key}={value}" for key, value in figures.items()))


@pytest.mark.faults
@pytest.mark.parametrize("bound", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("column", ["start_sec", "end_sec"])
def test_a_segment_bound_that_is_not_finite_is_refused(tmp_path: Path, column: str, bound: str) -> None:
    values = {"start_sec": "0.5", "end_sec": "2.0", column: bound}
    manifest = _write(
        tmp_path / "m.csv",
        f"path,label,start_sec,end_sec\na.mp4,0,0,1\nb.mp4,0,{values['start_sec']},{values['end_sec']}\n",
    )
    with pytest.raises(ManifestError) as raised:
        read_manifest(manifest)
    assert f"row 2 has {column} {float(bound)}: must be a finite number of seconds" in str(raised.value)
    parquet = tmp_path / "m.parquet"
    write_manifest(pa.table({"path": ["a.mp4"], "label": [0], column: [float(bound)]}), parquet)
    with pytest.raises(ManifestError, match=f"row 1 has {column} {float(bound)}"):
        read_manifest(parquet)
    _fault(f"manifest-{column}-{bound}", injected=1, refused_naming_the_row=1)


@pytest.mark.faults
def test_a_video_listed_twice_is_refused_naming_both_rows(tmp_path: Path) -> None:
    twice = _write(tmp_path / "twice.csv", "path,label\na.mp4,0\nb.mp4,1\n./a.mp4,0\n")
    with pytest.raises(ManifestError, match=r"rows 1 and 3 list the same video: '.*/a.mp4'$"):
        read_manifest(twice)
    two_labels = _write(tmp_path / "two_labels.csv", "path,label\na.mp4,0\nb.mp4,1\na.mp4,1\n")
    with pytest.raises(ManifestError, match=r"rows 1 and 3 list the same video with two labels \(0, 1\)"):
        read_manifest(two_labels)
    segments = _write(tmp_path / "segments.csv", "path,label,start_sec,end_sec\na.mp4,0,0,5\na.mp4,1,5,10\n")
    assert len(read_manifest(segments)) == 2  # two segments of one long video are two videos
    same_segment = _write(tmp_path / "same.csv", "path,label,start_sec,end_sec\na.mp4,0,0,5\na.mp4,0,0,5\n")
    with pytest.raises(ManifestError, match=r"rows 1 and 2 list the same video: '.*a.mp4' \[0.0, 5.0\] s"):
        read_manifest(same_segment)
    _fault("manifest-duplicates", injected=3, refused_naming_the_rows=3)


@pytest.mark.faults
def test_a_symlink_inside_the_root_that_points_outside_it_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "secret"
    (root / "videos").mkdir(parents=True)
    outside.mkdir()
    (outside / "x.mp4").write_bytes(b"not yours")
    (root / "videos" / "x.mp4").symlink_to(outside / "x.mp4")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "inside.mp4").write_bytes(b"ok")
    (root / "videos" / "alias.mp4").symlink_to(root / "inside.mp4")
    for listed in ("videos/x.mp4", "linked/x.mp4"):
        manifest = _write(root / "m.csv", f"path,label\ninside.mp4,0\n{listed},0\n")
        with pytest.raises(ManifestError, match=rf"row 2 path '{listed}' links to {outside}/x.mp4, outside the root"):
            read_manifest(manifest)
        assert len(read_manifest(manifest, allow_outside_root=True)) == 2
    inside = _write(root / "ok.csv", "path,label\ninside.mp4,0\nvideos/alias.mp4,1\n")
    assert len(read_manifest(inside)) == 2  # a link that stays inside the root is fine
    _fault("manifest-symlink-escape", injected=2, refused_naming_the_row=2)
