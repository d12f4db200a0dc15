"""Checkpoints are written atomically with a manifest written last, and read with weights_only: a torn, cut-off or
corrupt checkpoint never loads, and a full disk leaves a checkpoint whole or absent."""

import hashlib
import json
import re
import subprocess
import sys

import pyarrow.fs
import pytest
import torch

from pipeline.checkpoints import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    UnreadableTorchFile,
    checkpoint_folders,
    latest_checkpoint,
    load_state,
    newest_complete,
    read_torch_file,
    save_state,
    verify,
)
from pipeline.evaluation.loading import ModelReference, ModelSourceError, load_model
from pipeline.training.persist import copy_whole
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.faults  # torn and foreign checkpoints: part of the fault suite (`pytest -m faults`)


def summary(fault: str, **figures: int) -> None:
    print(f"FAULT {fault}: " + " ".join(f"{key}={value}" for key, value in figures.items()))


def test_round_trip(tmp_path):
    save_state(tmp_path, {"model": {"w": torch.arange(3.0)}, "loop": {"epoch": 2}, "mlflow_run_id": "abc"}, {"a": 1})
    state = load_state(tmp_path)
    assert torch.equal(state["model"]["w"], torch.arange(3.0)) and state["loop"]["epoch"] == 2
    assert verify(tmp_path)["a"] == 1


def test_crash_mid_write_leaves_no_valid_checkpoint(tmp_path):
    class Exploding:
        """Pickling this raises half-way through torch.save, as a crash mid-write would stop it."""

        def __reduce__(self):
            raise OSError("disk vanished")

    with pytest.raises(OSError):
        save_state(tmp_path, {"model": {"w": torch.zeros(1000)}, "boom": Exploding()})
    assert not (tmp_path / STATE_FILE).exists() and not (tmp_path / (STATE_FILE + ".tmp")).exists()
    with pytest.raises(CheckpointError, match="no state.pt"):
        load_state(tmp_path)


def test_crash_mid_rewrite_keeps_the_previous_checkpoint(tmp_path):
    save_state(tmp_path, {"loop": {"epoch": 1}})
    (tmp_path / (STATE_FILE + ".tmp")).write_bytes(b"partial garbage")
    assert load_state(tmp_path)["loop"]["epoch"] == 1


def test_truncated_file_is_refused_by_name(tmp_path):
    path = save_state(tmp_path, {"model": {"w": torch.zeros(10000)}})
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"has 2000 bytes, not \d+ \(torn\)"):
        load_state(tmp_path)


def test_a_flipped_byte_is_refused_by_name(tmp_path):
    path = save_state(tmp_path, {"model": {"w": torch.zeros(10000)}})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        load_state(tmp_path)


def test_a_state_without_its_manifest_is_incomplete(tmp_path):
    save_state(tmp_path, {"loop": {"epoch": 1}})
    (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint.json"):
        load_state(tmp_path)


def test_pickled_code_is_refused(tmp_path):
    save_state(tmp_path, {"loop": {}})
    torch.save({"format_version": 2, "payload": CheckpointError("x")}, tmp_path / STATE_FILE)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    data = (tmp_path / STATE_FILE).read_bytes()
    manifest["files"][STATE_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="holds more than tensors .* refuses .*CheckpointError"):
        load_state(tmp_path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"path,label\nvideos/a.mp4,0\n", r"not a PyTorch file \(it begins b'path,lab'\)"),  # a manifest
        (None, r"unreadable \(RuntimeError: PytorchStreamReader failed reading zip archive"),  # a torch.save cut short
        ("pickled code", r"holds more than tensors and plain containers, .*\(Unsupported global: .*CheckpointError"),
    ],
)
def test_a_file_that_is_not_a_weights_file_is_named_in_one_line(tmp_path, content, reason):
    """`jobs.predict` / `jobs.evaluate model=FILE`: one line naming the file and why, not torch's paragraph."""
    path = tmp_path / "model.pt"
    if content is None:
        torch.save({"weight": torch.zeros(64, 64)}, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif content == "pickled code":
        torch.save({"payload": CheckpointError("x")}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ModelSourceError) as raised:
        load_model(ModelReference(str(path)))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"model {path}: ")
    assert re.fullmatch(reason + ".*", message.removeprefix(f"model {path}: "))


@pytest.mark.parametrize(("name", "reason"), [("gone.pt", "No such file or directory"), ("", "Is a directory")])
def test_a_file_that_cannot_be_opened_is_named_with_the_os_reason(tmp_path, name, reason):
    """Also what a reader of a checkpoint meets when rotation removes it between its verification and its load: a
    one-line refusal naming the file, not the OSError of a second open."""
    path = tmp_path / name
    with pytest.raises(UnreadableTorchFile) as raised:
        read_torch_file(path)
    assert str(raised.value) == f"{path}: {reason}" and raised.value.reason == reason


def test_the_newest_complete_checkpoint_is_found_past_broken_ones(tmp_path):
    run = tmp_path / "runs" / "a"
    for step, name in enumerate(["checkpoint_2026-01-01_00-00-01.000000", "checkpoint_2026-01-01_00-00-02.000000"]):
        save_state(run / name, {"loop": {"step": step}})
    newest = run / "checkpoint_2026-01-01_00-00-03.000000"
    save_state(newest, {"loop": {"step": 2}})
    (newest / STATE_FILE).write_bytes(b"torn")
    folder, _, skipped = newest_complete(checkpoint_folders(run))
    assert folder.name.endswith("02.000000") and [f for f, _ in skipped] == [newest]
    assert "torn" in skipped[0][1]
    assert latest_checkpoint(str(tmp_path / "runs"), "a") == folder
    save_state(tmp_path / "runs" / "b" / "checkpoint_2026-01-02_00-00-00.000000", {"loop": {}})
    assert latest_checkpoint(str(tmp_path / "runs"), "").parent.name == "b"  # no run.name: the newest of any run
    summary("corrupt-newest-checkpoint-scan", injected=1, skipped_with_reason=len(skipped), fell_back_to_previous=1)


OUT_OF_SPACE = """
import resource, signal, sys
import pyarrow.fs, torch
from pipeline.checkpoints import save_state
from pipeline.training.persist import CheckpointUploadError, copy_whole
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))
try:
    save_state(sys.argv[1], {"model": {"w": torch.zeros(2**20)}})  # 4 MiB
except OSError as error:
    print("save_state:", error)
local = pyarrow.fs.LocalFileSystem()
try:
    copy_whole(sys.argv[2], local, sys.argv[3], "checkpoint_x", local)
except CheckpointUploadError as error:
    print("upload:", error)
"""


def test_a_write_that_runs_out_of_space_leaves_no_checkpoint_behind(tmp_path):
    """A process whose files may not grow past 1 MiB (RLIMIT_FSIZE: EFBIG, the error of a full disk) saves a 4 MiB
    checkpoint locally, then copies one into storage: both fail, and neither place holds a torn checkpoint, a
    temporary file or a staging folder. (The fault suite repeats this on a real full file system.)"""
    local_dir, source, storage = tmp_path / "local", tmp_path / "source", tmp_path / "storage"
    save_state(source, {"model": {"w": torch.zeros(2**20)}})
    storage.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", OUT_OF_SPACE, str(local_dir), str(source), str(storage)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "save_state: [Errno 27] File too large" in done.stdout, done.stdout
    assert "could not be written" in done.stdout and "none was left" in done.stdout, done.stdout
    assert list(local_dir.iterdir()) == [] and list(storage.iterdir()) == []
    local = pyarrow.fs.LocalFileSystem()
    final = copy_whole(str(source), local, str(storage), "checkpoint_x", local)  # with room: whole, and it loads
    assert load_state(final)["model"]["w"].numel() == 2**20
    assert sorted(path.name for path in storage.iterdir()) == ["checkpoint_x"]
    summary("checkpoint-out-of-space-rlimit", injected=2, torn_checkpoints_left=0, staging_or_tmp_left=0)
