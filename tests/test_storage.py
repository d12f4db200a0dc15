"""The object-storage layer against a real S3 server (moto's, on 127.0.0.1, behind the fault proxy): every byte goes
over HTTP. Missing objects and buckets, denials and outages are one line naming the URI (no credentials in it);
transient failures are retried; manifests, label maps, videos, checkpoints and the run lock work in a bucket as in a
folder. No Ray here (the unit lane): `tests/test_storage_run.py` runs the jobs."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch

from pipeline import checkpoints, storage
from pipeline.data import importers, manifest
from pipeline.data.video import VideoDecodeError, decode_frames, probe
from pipeline.errors import ConfigError
from pipeline.training import persist
from pipeline.training.run_lock import ObjectRunLock, run_lock
from tests.videos import VideoSpec, read_index, write_indexed_video


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    return s3.bucket("unit-tests")


@pytest.fixture()
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter waits between this layer's attempts (the SDK's own retries stay as they are)."""
    monkeypatch.setattr(storage, "FIRST_WAIT_S", 0.01)


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def test_bytes_text_listing_and_parquet_round_trip(bucket):
    storage.write_text(f"{bucket}/round/a.txt", "hello")
    storage.write_bytes(f"{bucket}/round/sub/b.bin", b"\x00\x01")
    table = pa.table({"x": [1, 2, 3]})
    storage.write_parquet(table, f"{bucket}/round/t.parquet")
    assert storage.read_text(f"{bucket}/round/a.txt") == "hello"
    assert storage.read_parquet(f"{bucket}/round/t.parquet").equals(table)
    listed = {(entry.name, entry.is_dir) for entry in storage.list_dir(f"{bucket}/round")}
    assert listed == {("a.txt", False), ("sub", True), ("t.parquet", False)}
    assert storage.is_dir(f"{bucket}/round/sub") and storage.info(f"{bucket}/round/sub/b.bin").size == 2
    storage.remove(f"{bucket}/round/a.txt")
    assert not storage.exists(f"{bucket}/round/a.txt")


def test_a_missing_key_or_bucket_is_one_line_naming_the_uri(bucket):
    with pytest.raises(storage.StorageError) as missing:
        storage.read_bytes(f"{bucket}/no/such.key")
    assert one_line(missing.value) == f"{bucket}/no/such.key: not found" and missing.value.kind == storage.MISSING
    with pytest.raises(storage.StorageError) as no_bucket:
        storage.read_bytes("s3://no-such-bucket-here/a.csv")
    assert (
        one_line(no_bucket.value) == "s3://no-such-bucket-here/a.csv: the bucket 'no-such-bucket-here' does not exist"
    )


def test_a_denied_access_names_the_uri_without_its_credentials(s3, bucket):
    storage.write_text(f"{bucket}/denied.txt", "secret data")
    s3.proxy.fail("unit-tests/denied.txt", times=20, status=403)
    try:
        with pytest.raises(storage.StorageError) as denied:
            storage.read_text("s3://AKIAEXAMPLE:sup3rSecretValue@unit-tests/denied.txt")
    finally:
        s3.proxy.clear()
    text = one_line(denied.value)
    assert text.startswith("s3://unit-tests/denied.txt: access denied to") and denied.value.kind == storage.DENIED_KIND
    assert "sup3rSecretValue" not in text and "AKIAEXAMPLE" not in text
    assert "sup3rSecretValue" not in storage.scrub("at s3://AKIAEXAMPLE:sup3rSecretValue@unit-tests/x and more")


def test_no_credentials_is_said_so(s3, bucket, monkeypatch):
    storage.write_text(f"{bucket}/anonymous.txt", "x")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3.proxy.fail("unit-tests/anonymous.txt", times=20, status=403)
    try:
        with pytest.raises(storage.StorageError) as denied:
            storage.read_text(f"{bucket}/anonymous.txt")
    finally:
        s3.proxy.clear()
    assert "no AWS credentials found" in one_line(denied.value)


def test_transient_failures_are_retried_and_an_outage_that_lasts_is_named(s3, bucket, fast_retries, monkeypatch):
    storage.write_text(f"{bucket}/flaky.txt", "survived")
    s3.proxy.fail("unit-tests/flaky.txt", times=4, status=503)  # more than the SDK's own 3 attempts
    s3.proxy.fail("unit-tests/flaky.txt", times=1, status=0)  # then a dropped connection
    try:
        assert storage.read_text(f"{bucket}/flaky.txt") == "survived"
        assert s3.proxy.traffic.failed["unit-tests/flaky.txt"] == 5
        monkeypatch.setattr(storage, "ATTEMPTS", 2)
        s3.proxy.fail("unit-tests/flaky.txt", times=100, status=500)
        with pytest.raises(storage.StorageError) as outage:
            storage.read_text(f"{bucket}/flaky.txt")
    finally:
        s3.proxy.clear()
    assert outage.value.kind == storage.UNAVAILABLE
    assert one_line(outage.value).startswith(f"{bucket}/flaky.txt: unavailable after 2 attempts to ")


def test_a_manifest_in_a_bucket_resolves_its_paths_under_a_uri_root(bucket, tmp_path):
    storage.write_text(f"{bucket}/k400/labels.txt", "cat\ndog\n")
    storage.write_text(f"{bucket}/k400/train.csv", "path,label\nvideos/a.mp4,cat\n../k400/videos/b.mp4,dog\n")
    table = manifest.read_manifest(f"{bucket}/k400/train.csv")
    assert table.column("path").to_pylist() == [f"{bucket}/k400/videos/a.mp4", f"{bucket}/k400/videos/b.mp4"]
    assert table.column("label").to_pylist() == [0, 1]
    rooted = manifest.read_manifest(f"{bucket}/k400/train.csv", root=f"{bucket}/k400/videos/..")
    assert rooted.column("path").to_pylist() == table.column("path").to_pylist()
    storage.write_text(f"{bucket}/k400/escape.csv", "path,label\n../../other-bucket/x.mp4,cat\n")
    with pytest.raises(manifest.ManifestError, match="outside the root s3://unit-tests/k400"):
        manifest.read_manifest(f"{bucket}/k400/escape.csv")
    with pytest.raises(manifest.ManifestError, match="manifest not found"):
        manifest.read_manifest(f"{bucket}/k400/missing.csv")


def test_a_video_in_a_bucket_decodes_to_the_same_frames_and_a_missing_one_is_named(s3, bucket, tmp_path):
    local = write_indexed_video(tmp_path / "v.mp4", VideoSpec(num_frames=30))
    storage.write_bytes(f"{bucket}/videos/v.mp4", local.read_bytes())
    uri = f"{bucket}/videos/v.mp4"
    info = probe(uri, check_last_frame=True)
    assert info == replace(probe(str(local), check_last_frame=True), path=uri)
    frames = decode_frames(uri, [0, 7, 29], info)
    assert [read_index(frame) for frame in frames] == [0, 7, 29]
    assert np.array_equal(frames, decode_frames(str(local), [0, 7, 29], probe(str(local))))
    s3.proxy.clear()
    decode_frames(uri, [3], info)
    assert s3.proxy.traffic.requests["unit-tests/videos/v.mp4"] <= 2  # a HEAD and one GET: fetched once, whole
    with pytest.raises(VideoDecodeError) as missing:
        probe(f"{bucket}/videos/gone.mp4")
    assert one_line(missing.value).endswith("file not found") and f"{bucket}/videos/gone.mp4" in str(missing.value)


def test_a_large_video_is_decoded_from_ranged_reads(s3, bucket, tmp_path, monkeypatch):
    from pipeline.data import video_source

    local = write_indexed_video(tmp_path / "big.mp4", VideoSpec(num_frames=60))
    storage.write_bytes(f"{bucket}/videos/big.mp4", local.read_bytes())
    monkeypatch.setattr(video_source, "WHOLE_FETCH_MAX_BYTES", 1)  # every object counts as large
    monkeypatch.setattr(video_source.VideoSource, "range_bytes", 4096)
    info = probe(f"{bucket}/videos/big.mp4")  # spooled to a local file
    frames = decode_frames(f"{bucket}/videos/big.mp4", [5, 50], info)
    assert [read_index(frame) for frame in frames] == [5, 50]


def test_importers_list_a_bucket_prefix_as_a_folder(bucket):
    for name in ("cat/1.mp4", "cat/2.mp4", "dog/3.mp4", "dog/notes.txt"):
        storage.write_bytes(f"{bucket}/folders/{name}", b"x")
    imported = importers.import_folders(f"{bucket}/folders", manifest_dir=f"{bucket}/folders")
    assert imported.names == ["cat", "dog"]
    assert imported.table.column("path").to_pylist() == ["cat/1.mp4", "cat/2.mp4", "dog/3.mp4"]
    assert imported.table.column("label").to_pylist() == [0, 0, 1]
    with pytest.raises(manifest.ManifestError, match="not a folder"):
        importers.import_folders(f"{bucket}/no-folders")


def _upload(folder: Path, run_uri: str, name: str) -> str:
    fs, inner = storage.filesystem(run_uri)
    return storage.uri_of(fs, persist.copy_whole(str(folder), pafs.LocalFileSystem(), inner, name, fs))


def test_checkpoints_in_a_bucket_verify_load_and_the_newest_complete_is_found(bucket, tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "loop": {"epoch": 1}}
    checkpoints.save_state(tmp_path / "c1", state, {"loop": {"epoch": 1, "step": 5}})
    checkpoints.save_state(tmp_path / "c2", {**state, "loop": {"epoch": 2}}, {"loop": {"epoch": 2, "step": 10}})
    run = f"{bucket}/runs/r"
    first = _upload(tmp_path / "c1", run, "checkpoint_2026-12-01_00-00-01.000000")
    second = _upload(tmp_path / "c2", run, "checkpoint_2026-12-01_00-00-02.000000")
    assert checkpoints.load_state(second)["loop"] == {"epoch": 2}
    assert checkpoints.latest_checkpoint(f"{bucket}/runs", "r") == second
    storage.write_bytes(f"{second}/state.pt", b"torn")  # a newer checkpoint that no longer matches its manifest
    found, manifest_, skipped = checkpoints.newest_complete(checkpoints.checkpoint_folders(run))
    assert found == first and manifest_["loop"]["step"] == 5 and "(torn)" in skipped[0][1]
    assert checkpoints.latest_checkpoint(f"{bucket}/runs", "") == first  # no run.name: the newest of any run
    with pytest.raises(checkpoints.CheckpointError, match="torn"):
        checkpoints.load_state(second)


def test_the_run_lock_in_a_bucket_refuses_a_second_driver(bucket):
    run_dir = f"{bucket}/runs/locked"
    lock = run_lock(run_dir, "locked")
    assert isinstance(lock, ObjectRunLock)
    with lock:
        assert storage.is_file(f"{run_dir}/.run.lock")
        with pytest.raises(ConfigError, match="in use by pid"):
            ObjectRunLock(run_dir, "locked").acquire()
    assert not storage.exists(f"{run_dir}/.run.lock")
    storage.write_text(f"{run_dir}/.run.lock", json.dumps({"host": socket.gethostname(), "pid": 999999999}))
    with ObjectRunLock(run_dir, "locked") as taken:  # a holder on this host that is gone: taken over
        assert "no longer running" in taken.note
