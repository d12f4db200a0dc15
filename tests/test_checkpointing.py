"""Checkpoints are written atomically and read with weights_only: a torn write never loads as valid."""

import pytest
import torch

from pipeline.checkpoints import STATE_FILE, CheckpointError, load_state, save_state

pytestmark = pytest.mark.faults  # torn and foreign checkpoints: part of the fault suite (`pytest -m faults`)


def test_round_trip(tmp_path):
    save_state(tmp_path, {"model": {"w": torch.arange(3.0)}, "loop": {"epoch": 2}, "mlflow_run_id": "abc"})
    state = load_state(tmp_path)
    assert torch.equal(state["model"]["w"], torch.arange(3.0)) and state["loop"]["epoch"] == 2


def test_crash_mid_write_leaves_no_valid_checkpoint(tmp_path):
    class Exploding:
        """Pickling this raises half-way through torch.save, as a crash mid-write would stop it."""

        def __reduce__(self):
            raise OSError("disk vanished")

    with pytest.raises(OSError):
        save_state(tmp_path, {"model": {"w": torch.zeros(1000)}, "boom": Exploding()})
    assert not (tmp_path / STATE_FILE).exists()
    with pytest.raises(CheckpointError, match="no state.pt"):
        load_state(tmp_path)


def test_crash_mid_rewrite_keeps_the_previous_checkpoint(tmp_path):
    save_state(tmp_path, {"loop": {"epoch": 1}})
    (tmp_path / (STATE_FILE + ".tmp")).write_bytes(b"partial garbage")
    assert load_state(tmp_path)["loop"]["epoch"] == 1


def test_truncated_file_is_refused_by_name(tmp_path):
    path = save_state(tmp_path, {"model": {"w": torch.zeros(10000)}})
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_state(tmp_path)


def test_pickled_code_is_refused(tmp_path):
    torch.save({"format_version": 1, "payload": CheckpointError("x")}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_state(tmp_path)
