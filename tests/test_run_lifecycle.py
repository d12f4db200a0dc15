"""Which run a command trains, decided on the driver without Ray: names, resume choices, refusals, the run lock.

Fault cases of the run lifecycle that need no training (the fault suite's runs cover the rest in test_faults.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from pipeline.checkpoints import STATE_FILE, CheckpointError, save_state
from pipeline.config import ConfigError, load_config, typed
from pipeline.errors import DataError
from pipeline.training import lifecycle
from pipeline.training.run_lock import LOCK_FILE, STALE_AFTER_S, RunLock
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.faults


def summary(fault: str, **figures: int) -> None:
    print(f"FAULT {fault}: " + " ".join(f"{key}={value}" for key, value in figures.items()))


def config(tmp_path: Path, *overrides: str):
    return typed(load_config(overrides=[f"run.storage_path={tmp_path / 'runs'}", *overrides]))


def checkpoint(run_dir: Path, second: int, epoch: int, step: int, **summary_fields: object) -> Path:
    folder = run_dir / f"checkpoint_2026-12-01_00-00-{second:02d}.000000"
    loop = {"epoch": epoch, "step": step, "step_in_epoch": 0}
    save_state(folder, {"loop": loop, "model": {"w": torch.zeros(4)}}, {"loop": loop, **summary_fields})
    return folder


def test_a_new_command_gets_a_distinguishable_name(tmp_path):
    cfg = config(tmp_path, "data.train=/data/k400/train_index.parquet")
    now = datetime(2026, 12, 1, 12, 34, 56)
    assert lifecycle.run_name(cfg, now) == "mvit_tiny-k400-20261201-123456"
    (tmp_path / "runs" / "mvit_tiny-k400-20261201-123456").mkdir(parents=True)
    assert lifecycle.run_name(cfg, now) == "mvit_tiny-k400-20261201-123456-2"
    assert lifecycle.run_name(config(tmp_path), now) == "mvit_tiny-demo-20261201-123456"


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "..", ".", "/etc"])
def test_a_run_name_that_leaves_the_storage_path_is_refused(name):
    with pytest.raises(ConfigError) as raised:
        load_config(overrides=[f"run.name={name}"])
    assert "run.name" in str(raised.value) and "\n" not in str(raised.value)
    summary("run-name-escape", injected=1, refused_naming_the_key=1)


def test_a_rerun_of_a_run_with_checkpoints_is_refused_unless_it_asks_to_resume(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    checkpoint(run_dir, 1, 1, 10)
    with pytest.raises(ConfigError, match=r"run.name 'r' already has 1 checkpoint\(s\).*run.resume=latest"):
        lifecycle.plan_run(config(tmp_path, "run.name=r"), "r")
    plan = lifecycle.plan_run(config(tmp_path, "run.name=r", "run.resume=latest"), "r")
    assert plan.start.parent == run_dir and plan.manifest["loop"]["step"] == 10
    summary("rerun-not-a-silent-no-op", injected=1, refused=1, resumed_when_asked=1)


def test_latest_passes_over_a_broken_newest_checkpoint_and_says_why(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    intact = checkpoint(run_dir, 1, 1, 10)
    broken = checkpoint(run_dir, 2, 2, 20)
    (broken / STATE_FILE).write_bytes((broken / STATE_FILE).read_bytes()[:100])
    plan = lifecycle.plan_run(config(tmp_path, "run.name=r", "run.resume=latest"), "r")
    assert plan.start == intact and plan.preexisting == (broken.name, intact.name)
    assert len(plan.notes) == 1 and plan.notes[0].startswith(f"skipped checkpoint {broken}: ")
    assert "state.pt has 100 bytes" in plan.notes[0] and plan.notes[0].endswith("(torn)")
    (intact / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        lifecycle.plan_run(config(tmp_path, "run.name=r", "run.resume=latest"), "r")


def test_latest_without_a_checkpoint_starts_the_run_and_a_path_must_be_complete(tmp_path):
    plan = lifecycle.plan_run(config(tmp_path, "run.name=new", "run.resume=latest"), "new")
    assert plan.start is None and "no checkpoint yet" in plan.notes[0]
    with pytest.raises(ConfigError, match="needs run.name"):
        lifecycle.run_name(config(tmp_path, "run.resume=latest"), datetime.now())
    chosen = checkpoint(tmp_path / "runs" / "old", 1, 1, 10)
    cfg = config(tmp_path, f"run.resume={chosen}")
    assert lifecycle.run_name(cfg, datetime.now()) == "old"  # the checkpoint's own run
    assert lifecycle.plan_run(cfg, "old").start == chosen
    (chosen / STATE_FILE).write_bytes(b"x")
    with pytest.raises(CheckpointError, match="torn"):
        lifecycle.plan_run(cfg, "old")


def test_a_changed_recipe_or_data_is_refused_naming_what_changed(tmp_path):
    public = {"train": {"lr": 0.004, "epochs": 3, "batch_size": 4}, "scaling": {"num_workers": 2}}
    data = {"data.train": "aa", "data.val": "bb"}
    plan = lifecycle.RunPlan("r", tmp_path, tmp_path / "c", {"config": public, "data": data})
    same = {"train": {"lr": 0.004, "epochs": 9, "batch_size": 4}, "scaling": {"num_workers": 4}}  # may change
    lifecycle.check_resumable(plan, config(tmp_path), same, data)
    changed = {"train": {"lr": 1.0, "epochs": 3, "batch_size": 8}, "scaling": {"num_workers": 2}}
    with pytest.raises(ConfigError) as raised:
        lifecycle.check_resumable(plan, config(tmp_path), changed, data)
    message = str(raised.value)
    assert "train.batch_size: 4 → 8; train.lr: 0.004 → 1.0" in message and "\n" not in message
    lifecycle.check_resumable(plan, config(tmp_path, "run.allow_recipe_change=true"), changed, data)
    allowed = "recipe change allowed by run.allow_recipe_change: "
    assert plan.notes == [f"{allowed}train.batch_size: 4 → 8", f"{allowed}train.lr: 0.004 → 1.0"]
    with pytest.raises(DataError, match=r"the data of run 'r' changed .*\(data.val: other content\)"):
        lifecycle.check_resumable(plan, config(tmp_path), same, {"data.train": "aa", "data.val": "cc"})
    summary("changed-recipe-or-data-on-resume", injected=2, refused_naming_the_keys=2)


def test_a_finished_run_is_recognised_and_a_larger_epochs_extends_it(tmp_path):
    folder = checkpoint(tmp_path / "runs" / "r", 1, 3, 30)
    plan = lifecycle.plan_run(config(tmp_path, "run.name=r", "run.resume=latest"), "r")
    assert plan.start == folder and lifecycle.finished(plan, 3) and not lifecycle.finished(plan, 4)


def test_the_data_identity_follows_the_content_not_the_path(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "train.csv").write_text("path,label\nx.mp4,0\n")
        (tmp_path / folder / "labels.txt").write_text("cat\n")
    first = lifecycle.data_identity(config(tmp_path, f"data.train={tmp_path}/a/train.csv").data)
    moved = lifecycle.data_identity(config(tmp_path, f"data.train={tmp_path}/b/train.csv").data)
    assert first == moved and set(first) == {"data.train", "data.labels"}
    (tmp_path / "b" / "labels.txt").write_text("dog\n")
    assert lifecycle.data_identity(config(tmp_path, f"data.train={tmp_path}/b/train.csv").data) != first


# ---- the run lock -----------------------------------------------------------------------------------------------
def test_a_second_driver_is_refused_while_the_first_holds_the_run(tmp_path):
    with RunLock(tmp_path / "r", "r"):
        with pytest.raises(ConfigError) as raised:
            RunLock(tmp_path / "r", "r").acquire()
        message = str(raised.value)
        assert f"run.name 'r': in use by pid {os.getpid()} on {socket.gethostname()}" in message
        assert "\n" not in message
    assert not (tmp_path / "r").exists()  # released, and the empty run folder with it
    with RunLock(tmp_path / "r", "r") as lock:
        assert lock.note is None
    summary("concurrent-run-lock", injected=1, second_refused=1)


def test_the_lock_of_a_dead_driver_is_taken_over(tmp_path):
    script = (
        "import os, sys\nfrom pathlib import Path\nfrom pipeline.training.run_lock import RunLock\n"
        "RunLock(Path(sys.argv[1]), 'r').acquire()\nos._exit(0)  # dies holding it\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "r")], cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0 and (tmp_path / "r" / LOCK_FILE).is_file()
    lock = RunLock(tmp_path / "r", "r")
    assert lock.acquire().startswith("took over the lock of pid ")
    lock.release()


def test_a_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    path = tmp_path / "r" / LOCK_FILE
    path.parent.mkdir()
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "process_started": 0.0, "since": "then"}))
    with pytest.raises(ConfigError, match="in use by pid 1 on elsewhere"):
        RunLock(tmp_path / "r", "r").acquire()
    old = time.time() - STALE_AFTER_S - 1
    os.utime(path, (old, old))
    lock = RunLock(tmp_path / "r", "r")
    assert "took over" in lock.acquire()
    lock.release()


def test_a_resume_reopens_its_mlflow_run_unless_the_store_lost_it_or_it_branches(mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import continue_run, create_run

    client = MlflowClient(mlflow_uri)
    old = create_run(mlflow_uri, "mvit", "/runs/r", "r")
    for step in (1, 2, 3, 4):
        client.log_metric(old, "train/loss", 1.0, step=step)
    assert continue_run(mlflow_uri, "mvit", "/runs/r", "r", old, 4, branch=True) == (old, None)
    assert continue_run(mlflow_uri, "mvit", "/runs/r", "r", old, 2, branch=False) == (old, None)  # a fallback
    branched, note = continue_run(mlflow_uri, "mvit", "/runs/r", "r", old, 2, branch=True)
    assert branched != old and "went on past the checkpoint's step 2 (to step 4)" in note
    lost, note = continue_run(mlflow_uri, "mvit", "/runs/r", "r", "0123456789abcdef0123456789abcdef", 2, branch=False)
    assert "is not in the store" in note and "(lost or recreated)" in note
    tags = client.get_run(lost).data.tags
    assert (
        tags["mvit.resumed_from_run_id"] == "0123456789abcdef0123456789abcdef" and tags["mvit.resumed_at_step"] == "2"
    )
    assert client.get_run(lost).info.run_name == "r"
