"""Importers turn the formats datasets come in into manifests; the CLI writes them with their label map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.prepare import main
from pipeline.data.importers import import_folders, import_kinetics, import_pyslowfast, import_ssv2
from pipeline.data.manifest import ManifestError, read_label_map, read_manifest

KINETICS_CSV = """label,youtube_id,time_start,time_end,split
zumba,abc123,14,24,train
"passing American football (in game)",-xyz_9,0,10,train
abseiling,q1w2e3,120,130,val
"""


def test_kinetics_paths_follow_the_split_label_id_start_end_layout(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(KINETICS_CSV)
    imported = import_kinetics(tmp_path / "train.csv")
    assert imported.names == ["abseiling", "passing American football (in game)", "zumba"]
    assert imported.table.column("path").to_pylist() == [
        "train/zumba/abc123_000014_000024.mp4",
        "train/passing American football (in game)/-xyz_9_000000_000010.mp4",
        "val/abseiling/q1w2e3_000120_000130.mp4",
    ]
    assert imported.table.column("label").to_pylist() == [2, 1, 0]
    given = import_kinetics(tmp_path / "train.csv", names=["zumba", "abseiling", "passing American football (in game)"])
    assert given.table.column("label").to_pylist() == [0, 2, 1]
    with pytest.raises(ManifestError, match="unknown label 'zumba'"):
        import_kinetics(tmp_path / "train.csv", names=["abseiling", "passing American football (in game)"])


def test_pyslowfast_lists_allow_spaces_in_paths(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("videos/a b.mp4 2\nvideos/c.mp4 0\n\n")
    imported = import_pyslowfast(tmp_path / "train.csv")
    assert imported.table.column("path").to_pylist() == ["videos/a b.mp4", "videos/c.mp4"]
    assert imported.table.column("label").to_pylist() == [2, 0]
    assert imported.names == ["0", "1", "2"]
    (tmp_path / "bad.csv").write_text("videos/c.mp4\n")
    with pytest.raises(ManifestError, match="line 1 is not `path label`"):
        import_pyslowfast(tmp_path / "bad.csv")


def test_ssv2_templates_become_class_names(tmp_path: Path) -> None:
    labels = {"Holding something next to something": "1", "Approaching something with your camera": "0"}
    videos = [
        {"id": "78687", "label": "holding potato next to vicks", "template": "Holding [something] next to [something]"},
        {"id": "42326", "label": "approaching a cup", "template": "Approaching [something] with your camera"},
    ]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "train.json").write_text(json.dumps(videos))
    imported = import_ssv2(tmp_path / "train.json", tmp_path / "labels.json")
    assert imported.names == ["Approaching something with your camera", "Holding something next to something"]
    assert imported.table.column("path").to_pylist() == ["78687.webm", "42326.webm"]
    assert imported.table.column("label").to_pylist() == [1, 0]
    (tmp_path / "test.json").write_text(json.dumps([{"id": "1"}]))
    with pytest.raises(ManifestError, match="test sets have no labels"):
        import_ssv2(tmp_path / "test.json", tmp_path / "labels.json")


def test_folders_are_classes_in_sorted_order(tmp_path: Path) -> None:
    for relative in ["walk/2.mp4", "walk/1.avi", "run/x.webm", "run/notes.txt", ".hidden/y.mp4"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    imported = import_folders(tmp_path, manifest_dir=tmp_path)
    assert imported.names == ["run", "walk"]
    assert imported.table.column("path").to_pylist() == ["run/x.webm", "walk/1.avi", "walk/2.mp4"]
    assert imported.table.column("label").to_pylist() == [0, 1, 1]


def test_the_cli_writes_a_manifest_and_label_map_and_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "train.csv").write_text(KINETICS_CSV)
    out = tmp_path / "manifests" / "train.parquet"
    assert main(["import", "kinetics", "--csv", str(tmp_path / "train.csv"), "--out", str(out)]) == 0
    assert read_label_map(out.parent / "labels.txt")[0] == "abseiling"
    manifest = read_manifest(out, root=tmp_path / "kinetics")
    assert manifest.column("path").to_pylist()[2] == str(tmp_path / "kinetics/val/abseiling/q1w2e3_000120_000130.mp4")

    (tmp_path / "other.csv").write_text("label,youtube_id,time_start,time_end,split\nyoga,a,0,10,val\n")
    assert main(["import", "kinetics", "--csv", str(tmp_path / "other.csv"), "--out", str(out)]) == 3
    assert main(["import", "pyslowfast", "--list", str(tmp_path / "missing.txt"), "--out", str(out)]) == 3
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "different class names" in errors[0] and errors[1].startswith("jobs.prepare: error:")


def test_imported_folders_resolve_as_the_reader_resolves_and_keep_the_train_numbering(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The README's `import folders --root my_videos/train --out train.parquet`: the written paths resolve from
    the manifest's folder, and `--labels` numbers a val split that lacks a class the way train numbers it."""
    for relative in ["my_videos/train/run/1.mp4", "my_videos/train/walk/2.mp4", "my_videos/val/walk/3.mp4"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    train = tmp_path / "train.parquet"
    assert main(["import", "folders", "--root", str(tmp_path / "my_videos/train"), "--out", str(train)]) == 0
    paths = read_manifest(train).column("path").to_pylist()
    assert paths == [str(tmp_path / "my_videos/train/run/1.mp4"), str(tmp_path / "my_videos/train/walk/2.mp4")]
    val = tmp_path / "val" / "val.parquet"
    labels = ["--labels", str(tmp_path / "labels.txt")]
    assert main(["import", "folders", "--root", str(tmp_path / "my_videos/val"), "--out", str(val), *labels]) == 0
    assert "its paths start at" in capsys.readouterr().out  # the videos are not under the manifest's folder
    assert read_manifest(val, root=tmp_path / "my_videos/val").column("label").to_pylist() == [1]
