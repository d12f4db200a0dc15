"""Fault injection: real faults in real runs (local Ray, sqlite MLflow, encoded videos), and what each one costs.

Each test prints one `FAULT ...` summary line (shown with `pytest -s`): faults injected, runs completed, and steps or
videos lost or duplicated. Run the suite alone with `pytest -m faults`.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import tracking
from pipeline.checkpoints import STATE_FILE, CheckpointError, checkpoint_folders, load_state, save_state
from pipeline.config import ConfigError, load_config, typed
from pipeline.data import dataset, index
from pipeline.data.sampling import ClipSpec
from pipeline.data.skips import DEATHS_BEFORE_SKIP, SkipSnapshot, epoch_counts, skip_counter
from pipeline.errors import DataError
from pipeline.training.driver import build_trainer, plan_data, resolve_paths, run_training
from pipeline.training.job import TrainJob
from pipeline.training.persist import upload_whole
from pipeline.training.worker import NonFiniteLossError, WorkerLoop
from tests.clips import decode_tasks, eval_transform
from tests.conftest import REPO_ROOT
from tests.mlflow_server import PASSWORD_VARIABLE, TrackingServer
from tests.mlflow_server import tracking_server as start_tracking_server
from tests.videos import VideoSpec, index_of, write_indexed_video

pytestmark = pytest.mark.faults


def summary(fault: str, **figures: int) -> None:
    print(f"FAULT {fault}: " + " ".join(f"{key}={value}" for key, value in figures.items()))


def write_noise_video(path: Path, num_frames: int = 240, size: tuple[int, int] = (480, 360)) -> Path:
    """Nearly lossless noise in one GOP: every clip of it takes a long decode (~0.5 s), long enough to catch."""
    width, height = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(
            "libx264",
            rate=30,
            options={"preset": "ultrafast", "crf": "5", "x264-params": f"keyint={num_frames}:scenecut=0:threads=1"},
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, 30)
        for _ in range(num_frames):
            frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def decoding(target: str) -> list[int]:
    """PIDs of this session's processes (Ray's workers are its descendants) that have `target` open: decoding it."""
    pids = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(opened.path == target for opened in process.open_files()):
                pids.append(process.pid)
    return pids


class DecoderKiller(threading.Thread):
    """Kills, with SIGSEGV, every process that decodes `target`, up to `limit` times."""

    def __init__(self, target: str, limit: int) -> None:
        super().__init__(daemon=True)
        self.target, self.limit = target, limit
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while len(self.killed) < self.limit and not self.stop.is_set():
            for pid in decoding(self.target):
                if pid not in self.killed:
                    os.kill(pid, signal.SIGSEGV)
                    self.killed.append(pid)
            time.sleep(0.005)


def test_a_decoder_that_kills_its_process_costs_one_video_not_the_epoch(ray_session, tmp_path):
    """The first death is pinned on no video (a first attempt notes none); the careful retries pin the next two on
    the crashing video, which is then skipped."""
    good = [write_indexed_video(tmp_path / f"good{number}.mp4", VideoSpec(num_frames=40)) for number in range(6)]
    crashing = write_noise_video(tmp_path / "crashing.mp4")
    paths = [*good[:3], crashing, *good[3:]]  # one task holds all: rows before the crash were already yielded
    counter_name = f"faults-{uuid.uuid4().hex}"
    tasks = decode_tasks(videos_per_task=len(paths), skip_counter=counter_name)
    clips = dataset.val_dataset(index_of(paths), spec=ClipSpec(8, 2, 30.0), transform=eval_transform(), tasks=tasks)
    counter = skip_counter(counter_name)

    killer = DecoderKiller(str(crashing), DEATHS_BEFORE_SKIP + 1)
    killer.start()
    first = sorted(row["label"] for row in clips.take_all())
    killer.stop.set()
    killer.join()
    second = sorted(row["label"] for row in clips.take_all())  # the next epoch: new tasks, a fresh chance

    others = [label for label, path in enumerate(paths) if path != crashing]
    assert len(killer.killed) == DEATHS_BEFORE_SKIP + 1
    assert first == others, "every other video exactly once"
    assert second == list(range(len(paths)))
    reasons = counter.reasons()
    assert list(reasons) == [str(crashing)] and "decoding process died" in reasons[str(crashing)]
    assert counter.totals().skipped == 1
    summary(
        "decoder-crash",
        injected=len(killer.killed),
        epochs_completed=2,
        videos_skipped_and_counted=1,
        videos_lost=len(others) - len(set(first)),
        videos_duplicated=len(first) - len(set(first)),
    )


def test_losing_the_skip_counter_mid_epoch_costs_only_its_counts(ray_session, tmp_path):
    """SIGKILL to the counter's process (Ray restarts it, empty), then a permanent ray.kill, each in the middle of
    an epoch: both epochs deliver every video once, and reading the counts never raises."""
    paths = [write_indexed_video(tmp_path / f"v{number}.mp4", VideoSpec(num_frames=40)) for number in range(8)]
    counter_name = f"faults-{uuid.uuid4().hex}"
    tasks = decode_tasks(videos_per_task=1, concurrency=1, skip_counter=counter_name)
    shards = skip_counter(counter_name).shards
    pids = ray.get([shard.__ray_call__.remote(lambda _: os.getpid()) for shard in shards])
    kills = [
        lambda: [os.kill(pid, signal.SIGKILL) for pid in pids],
        lambda: [ray.kill(shard, no_restart=True) for shard in shards],
    ]

    delivered = []
    for epoch, kill in enumerate(kills):
        clips = dataset.val_dataset(
            index_of(paths), spec=ClipSpec(8, 2, 30.0), transform=eval_transform(), tasks=tasks, epoch=epoch
        )
        labels = []
        for row in clips.iter_rows():
            if not labels:
                kill()  # the first of 8 one-video tasks has reported; 7 are still to run
            labels.append(row["label"])
        delivered.append(sorted(labels))
        assert epoch_counts(counter_name, epoch) in (None, SkipSnapshot())
    assert delivered == [list(range(len(paths)))] * 2
    summary("skip-counter-lost", injected=len(kills), epochs_completed=len(delivered), videos_lost=0)


def test_a_decode_node_lost_mid_epoch_is_absorbed_by_retries(tmp_path):
    videos = [write_indexed_video(tmp_path / f"v{number}.mp4", VideoSpec(num_frames=40)) for number in range(16)]
    pq.write_table(index_of(videos), tmp_path / "index.parquet")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO_ROOT))
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.cluster_node_loss",
                str(tmp_path / "index.parquet"),
                str(tmp_path / "result.json"),
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        leftovers_after(ray_tmp, grace=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["decodes_under_way_at_loss"] >= 1
    assert sorted(result["labels"]) == list(range(len(videos))) and not result["skipped"]
    summary(
        "decode-node-loss",
        injected=1,
        epochs_completed=1,
        decodes_cut_off=result["decodes_under_way_at_loss"],
        videos_lost=len(videos) - len(set(result["labels"])),
        videos_duplicated=len(result["labels"]) - len(set(result["labels"])),
    )


# ---- training runs ----------------------------------------------------------------------------------------------
EPOCHS = 3  # the worker is killed in the first, the driver in the second, and the rerun finishes the third
STEPS_PER_EPOCH = 13  # 52 training videos x 2 clips // (batch 4 x 2 workers)
CHECKPOINT_EVERY = 6  # steps: two checkpoints inside each epoch, and one at its end


@dataclass(frozen=True)
class Demo:
    """The demo videos, probed once into indexes so that no run probes them again; the training manifest also
    lists a few unusable files, which every run must leave out and report."""

    train: Path
    val: Path
    labels: Path
    unusable: tuple[str, ...]


def add_unusable_videos(manifest: Path) -> tuple[str, ...]:
    """Append an empty file, a truncated video and a text file to `manifest`; returns their paths."""
    folder = manifest.parent / "unusable"
    folder.mkdir()
    (folder / "empty.mp4").write_bytes(b"")
    whole = min((manifest.parent / "videos").rglob("*.mp4")).read_bytes()  # a good video of the demo
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.mp4").write_text("not a video\n" * 100)
    names = ("empty.mp4", "truncated.mp4", "notes.mp4")
    with open(manifest, "a") as rows:
        rows.writelines(f'"unusable/{name}",0\n' for name in names)
    return tuple(str(folder / name) for name in names)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[TrackingServer]:
    """Started with the module's demo data (its start-up, tens of seconds on 2 cores, overlaps the probing)."""
    root = tmp_path_factory.mktemp("mlflow")
    with start_tracking_server(root, str(root / "artifacts")) as server:
        yield server


@pytest.fixture(scope="module")
def demo(ray_session, make_demo, tracking_server) -> Demo:
    made = make_demo(seed=0, num_classes=4, videos_per_class=16)
    unusable = add_unusable_videos(made.train_manifest)
    return Demo(
        index.build_index(made.train_manifest, made.root / "train.parquet").path,
        index.build_index(made.val_manifest, made.root / "val.parquet").path,
        made.label_map,
        unusable,
    )


def faults_overrides(run_overrides: Callable[..., list[str]], root: Path, demo: Demo, *extra: str) -> list[str]:
    """The shared small run (`run_overrides`) on this module's demo: named "faults", no models logged, and a
    checkpoint every CHECKPOINT_EVERY steps."""
    return run_overrides(
        root,
        demo.train,
        demo.val,
        f"data.labels={demo.labels}",
        "run.name=faults",
        "mlflow.log_models=false",
        "train.lr=4e-3",
        f"train.checkpoint_every_steps={CHECKPOINT_EVERY}",
        *extra,
    )


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint of `run_dir` with the most steps; one still being written does not load, and is passed over."""
    found = []
    for folder in run_dir.glob("checkpoint_*"):
        try:
            found.append((folder, load_state(folder)))
        except CheckpointError:
            continue
    return max(found, key=lambda item: item[1]["loop"]["step"], default=None)


def wait_for_checkpoint(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> int:
    """Block until a checkpoint at `step` or later exists; returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the driver exited with {process.returncode} before step {step}"
        latest = latest_checkpoint(run_dir)
        if latest and latest[1]["loop"]["step"] >= step:
            return latest[1]["loop"]["step"]
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint at step {step} within {timeout} s")


def train_worker_pids(driver_pid: int) -> list[int]:
    """Ray Train worker processes under this driver (they descend from the raylet the driver started); one that
    exits while they are listed is not one."""
    found = []
    for child in psutil.Process(driver_pid).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith("ray::RayTrainWorker"):
                found.append(child.pid)
        except psutil.NoSuchProcess:  # ZombieProcess too
            continue
    return sorted(found)


def processes_of(ray_tmp: Path) -> list[psutil.Process]:
    """Every live process of the Ray that was started with RAY_TMPDIR=ray_tmp (all of them inherit it)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("RAY_TMPDIR") == str(ray_tmp) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def leftovers_after(ray_tmp: Path, grace: float = 30) -> list[str]:
    """The processes of that Ray that outlive `grace` seconds, as "command (pid, age)"; they are killed, so later
    tests are not starved."""
    deadline = time.monotonic() + grace
    while (alive := processes_of(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    named = []
    for process in alive:
        try:
            command = " ".join(process.cmdline())[:120]
            named.append(f"{command} (pid {process.pid}, started {time.time() - process.create_time():.0f} s ago)")
            process.kill()
        except psutil.NoSuchProcess:
            continue
    return named


def history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    """The values of metric `key`, in step order."""
    return [metric.value for metric in sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)]


def step_faults(client: MlflowClient, run_id: str, key: str, last_step: int) -> tuple[int, int]:
    """(steps lost, steps logged more than once) in the history of `key`, against steps 1..last_step."""
    steps = [metric.step for metric in client.get_metric_history(run_id, key)]
    return len(set(range(1, last_step + 1)) - set(steps)), len(steps) - len(set(steps))


@dataclass
class DriverScenario:
    """What happened to a `python -m jobs.train` run whose worker, then driver, were killed, and to its rerun."""

    root: Path
    overrides: list[str]
    tracking_uri: str  # the MLflow server, without credentials
    workers_restarted: int  # of the worker group that lost one process
    corrupted: Path  # the newest checkpoint when the worker died, made unloadable just before
    recovered_to_step: int  # the checkpoint that proved training went on after the dead worker
    second: subprocess.CompletedProcess  # the same command started while the first ran
    second_seconds: float
    torn_before_rerun: Path  # the newest whole checkpoint the dead driver left, cut in half before the rerun
    resumed_from: Path  # the whole one before it, which the rerun must continue from (then rotated out)
    resumed_from_step: int
    leftover_processes: list[str]  # of the dead driver's Ray, 30 s after its death
    first_run_id: str
    first_pid: int
    first_log: str
    rerun: subprocess.CompletedProcess
    password_found_in: list[str] = field(default_factory=list)
    places_searched: int = 0


@contextmanager
def driver(overrides: list[str], ray_tmp: Path, log: Path, env_extra: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`python -m jobs.train` starting its own local Ray, isolated from this session's by RAY_TMPDIR; killed on
    the way out if still running."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), **env_extra)
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobs.train", *overrides],
            cwd=REPO_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def corrupt(folder: Path) -> Path:
    """Cut the checkpoint's state.pt in half, as a full disk or a lost copy would."""
    state = folder / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    return folder


def newest_folder(run_dir: Path) -> Path:
    return checkpoint_folders(run_dir)[0]


def wait_until_registered(folder: Path, timeout: float = 120) -> None:
    """Block until Ray Train has registered the checkpoint `folder` (it is then what `get_checkpoint()` gives a
    restarted worker group): its name appears in the run's checkpoint manager snapshot."""
    snapshot = folder.parent / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if snapshot.is_file() and folder.name in snapshot.read_text():
            return
        time.sleep(0.2)
    raise TimeoutError(f"Ray Train did not register {folder} within {timeout} s")


def same_command_while_running(overrides: list[str], ray_tmp: Path, env_extra: dict[str, str]) -> tuple:
    """The same command again, while the first still holds the run: (completed process, seconds it took)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), **env_extra)
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", *overrides], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    return done, time.monotonic() - began


def kill_worker_then_driver_then_rerun(
    root: Path, overrides: list[str], ray_tmp: Path, server: TrackingServer
) -> DriverScenario:
    run_dir = root / "runs" / "faults"
    env_extra = {PASSWORD_VARIABLE: server.password}
    with driver(overrides, ray_tmp, root / "first.log", env_extra) as first:
        wait_for_checkpoint(run_dir, 2 * CHECKPOINT_EVERY, first)
        time.sleep(1.0)  # a few steps past it
        newest = newest_folder(run_dir)
        wait_until_registered(newest)
        workers = train_worker_pids(first.pid)
        corrupted = corrupt(newest)
        os.kill(workers[0], signal.SIGKILL)
        second, second_seconds = same_command_while_running(overrides, ray_tmp, env_extra)
        recovered = wait_for_checkpoint(run_dir, 3 * CHECKPOINT_EVERY, first)
        restarted = len(set(workers) - set(train_worker_pids(first.pid)))
        time.sleep(1.0)
        first.kill()  # SIGKILL to the driver alone: the Ray it started must go down with it
        first.wait()
    leftovers = leftovers_after(ray_tmp)
    torn = corrupt(latest_checkpoint(run_dir)[0])
    resumed_from, resumed_state = latest_checkpoint(run_dir)
    first_log = (root / "first.log").read_text()
    first_run_id = re.search(r"MLflow run (\w+) in experiment", first_log).group(1)
    with driver(overrides, ray_tmp, root / "rerun.log", env_extra) as rerun:
        rerun.wait(timeout=500)
    completed = subprocess.CompletedProcess(rerun.args, rerun.returncode, (root / "rerun.log").read_text())
    return DriverScenario(
        root,
        overrides,
        server.url,
        restarted,
        corrupted,
        recovered,
        second,
        second_seconds,
        torn,
        resumed_from,
        resumed_state["loop"]["step"],
        leftovers,
        first_run_id,
        first.pid,
        first_log,
        completed,
    )


def places_holding(secret: str, folders: list[Path]) -> tuple[list[str], int]:
    """The files under `folders` whose bytes hold `secret`, and how many files were searched."""
    found, searched = [], 0
    for path in (path for folder in folders for path in folder.rglob("*")):
        try:
            if path.is_file():
                searched += 1
                if secret.encode() in path.read_bytes():
                    found.append(str(path))
        except OSError:
            continue
    return found, searched


@pytest.fixture(scope="module")
def driver_scenario(demo, tmp_path_factory, run_overrides, tracking_server) -> DriverScenario:
    """`python -m jobs.train ... run.resume=latest`, tracked on an MLflow server through a URI with a password from
    the environment. Corrupt the newest checkpoint and kill a training worker mid-epoch (the restart must pass over
    the corrupt one); start the same command a second time while the first runs (refused); once the run has
    recovered and checkpointed again, kill the driver itself, mid-epoch; cut the newest checkpoint it left in half
    (the rerun must pass over it too); then run the same command again. Last, look for the password in everything
    the runs wrote and printed."""
    root = tmp_path_factory.mktemp("driver")
    overrides = faults_overrides(
        run_overrides,
        root,
        demo,
        f"train.epochs={EPOCHS}",
        "scaling.max_failures=1",
        "run.resume=latest",
        f"mlflow.tracking_uri={tracking_server.uri_with_password}",
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    tracking_server.wait()
    try:
        scenario = kill_worker_then_driver_then_rerun(root, overrides, ray_tmp, tracking_server)
        found, searched = places_holding(tracking_server.password, [root, ray_tmp, tracking_server.root])
        scenario.password_found_in, scenario.places_searched = found, searched
        return scenario
    finally:
        leftovers_after(ray_tmp, grace=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_dead_training_worker_costs_no_step_and_the_run_finishes(driver_scenario):
    """The restart also meets a corrupt newest checkpoint: it passes over it, says so, and continues from the one
    before (Ray Train's own `get_checkpoint()` gives the corrupt one)."""
    scenario = driver_scenario
    assert scenario.workers_restarted == 2 and scenario.recovered_to_step >= 3 * CHECKPOINT_EVERY
    assert scenario.rerun.returncode == 0, scenario.rerun.stdout[-4000:]
    skipped = re.findall(rf"skipped checkpoint {re.escape(str(scenario.corrupted))}: .*\(torn\)", scenario.first_log)
    assert len(skipped) == 2, scenario.first_log[-6000:]  # once per rank
    client = MlflowClient(scenario.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("mvit").experiment_id])
    assert [run.info.run_id for run in runs] == [scenario.first_run_id]
    assert runs[0].info.status == "FINISHED"
    last_step = EPOCHS * STEPS_PER_EPOCH
    lost, duplicated = step_faults(client, scenario.first_run_id, "train/loss", last_step)
    assert (lost, duplicated) == (0, 0)
    epochs = [metric.value for metric in client.get_metric_history(scenario.first_run_id, "train/epoch")]
    assert sorted(epochs) == [float(epoch) for epoch in range(1, EPOCHS + 1)]
    top1 = history(client, scenario.first_run_id, "val/top1")
    assert len(top1) == EPOCHS, top1
    # No accuracy floor (where the restarts fall changes the run: one CI run stayed at chance for 4 epochs, losing no
    # step); tests/test_train.py's uninterrupted run checks learning. The restarts' state does show: the learning
    # rate, a function of the step alone, rises through the warm-up and then only falls (a restart that lost the
    # schedule's state would jump back to the warm-up's start).
    losses = history(client, scenario.first_run_id, "train/loss")
    assert len(losses) == last_step and all(math.isfinite(loss) for loss in losses), losses
    rates = history(client, scenario.first_run_id, "train/lr")
    peak = rates.index(max(rates))
    assert 0 < peak < len(rates) - 1 and len(rates) == last_step, rates
    assert rates[: peak + 1] == sorted(rates[: peak + 1]) and rates[peak:] == sorted(rates[peak:], reverse=True), rates
    summary(
        "worker-kill",
        injected=1,
        runs_completed=1,
        steps_lost=lost,
        steps_duplicated=duplicated,
        final_val_top1_pct=round(top1[-1] * 100),
    )
    summary("corrupt-newest-checkpoint-on-restart", injected=1, skipped_and_named=1, run_lost=0)


def test_unusable_videos_are_left_out_of_a_run_and_listed(driver_scenario, demo):
    client = MlflowClient(driver_scenario.tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        listed = Path(client.download_artifacts(driver_scenario.first_run_id, "excluded_videos.tsv", folder))
        rows = dict(line.split("\t") for line in listed.read_text().splitlines())
    assert sorted(rows) == sorted(demo.unusable) and all(rows.values())
    summary("unusable-videos-in-a-run", injected=len(demo.unusable), left_out_and_listed=len(rows), runs_completed=1)


def test_a_dead_driver_resumes_when_the_same_command_runs_again(driver_scenario):
    scenario = driver_scenario
    assert scenario.leftover_processes == [], f"the dead driver's Ray outlived it: {scenario.leftover_processes}"
    assert scenario.rerun.returncode == 0, scenario.rerun.stdout[-4000:]
    assert f"took over the lock of pid {scenario.first_pid} on " in scenario.rerun.stdout
    assert f"MLflow run {scenario.first_run_id} in experiment" in scenario.rerun.stdout
    assert f"MLflow run id: {scenario.first_run_id}" in scenario.rerun.stdout
    state = latest_checkpoint(scenario.root / "runs" / "faults")[1]
    assert state["loop"]["epoch"] == EPOCHS and state["loop"]["step"] == EPOCHS * STEPS_PER_EPOCH
    client = MlflowClient(scenario.tracking_uri)
    lost, duplicated = step_faults(client, scenario.first_run_id, "train/loss", EPOCHS * STEPS_PER_EPOCH)
    assert (lost, duplicated) == (0, 0)
    summary(
        "driver-kill",
        injected=1,
        runs_completed=1,
        same_mlflow_run=1,
        steps_lost=lost,
        steps_duplicated=duplicated,
        leftover_ray_processes=len(scenario.leftover_processes),
        resumed_from_step=scenario.resumed_from_step,
    )


def test_a_second_command_for_a_running_run_is_refused(driver_scenario):
    second = driver_scenario.second
    lines = [line for line in second.stderr.splitlines() if line]
    assert second.returncode == 2, second.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("jobs.train: error: run.name 'faults': in use by pid "), lines
    assert f"pid {driver_scenario.first_pid} on " in lines[0]
    assert "Started a local Ray instance" not in second.stdout + second.stderr  # refused before Ray started
    summary(
        "concurrent-run",
        injected=1,
        second_refused=1,
        second_ran_seconds=round(driver_scenario.second_seconds),
        steps_duplicated=0,
    )


def test_a_password_in_the_tracking_uri_is_written_and_printed_nowhere(driver_scenario):
    """The runs reached the MLflow server through `http://faults:${oc.env:...}@host`: the workers resolved the
    password themselves (the run logged everything), and no file of the runs, their logs (stdout with the workers'
    output, Ray's session logs), checkpoints, the MLflow store or its artifacts holds it."""
    scenario = driver_scenario
    assert scenario.places_searched > 100 and scenario.password_found_in == [], scenario.password_found_in
    client = MlflowClient(scenario.tracking_uri)
    params = client.get_run(scenario.first_run_id).data.params
    assert params["mlflow.tracking_uri"] == scenario.tracking_uri
    with tempfile.TemporaryDirectory() as folder:
        config_yaml = Path(client.download_artifacts(scenario.first_run_id, "config.yaml", folder)).read_text()
    assert f"tracking_uri: {scenario.tracking_uri}" in config_yaml
    summary(
        "secrets",
        injected=1,
        files_searched=scenario.places_searched,
        files_holding_the_password=len(scenario.password_found_in),
    )


# ---- numerics ---------------------------------------------------------------------------------------------------
def parameters(trainer: WorkerLoop) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in trainer.model.parameters()]


def optimizer_state(trainer: WorkerLoop) -> list[torch.Tensor]:
    """Copies of every tensor of the optimizer's state (AdamW: step, exp_avg, exp_avg_sq of each parameter)."""
    return [value.clone() for state in trainer.step.optimizer.state.values() for value in state.values()]


def unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return len(before) == len(after) and all(torch.equal(old, new) for old, new in zip(before, after))


def overflow_is_absorbed(trainer: WorkerLoop, batch: dict[str, torch.Tensor]) -> int:
    """fp16: with a loss scale of 2^24 every step overflows; each is skipped and halves the scale, until one fits.
    Returns how many steps were skipped."""
    trainer.step(batch, 0.0)  # the scaler's first step creates its scale
    trainer.step.scaler.update(2.0**24)
    before, skipped = parameters(trainer), 0
    while True:
        scale = trainer.step.scaler.get_scale()
        loss, applied = trainer.step(batch, 0.0)
        if applied:
            break
        skipped += 1
        assert trainer.step.scaler.get_scale() == scale / 2 and unchanged(before, parameters(trainer))
    assert math.isfinite(loss) and not unchanged(before, parameters(trainer))
    return skipped


def non_finite_step_is_skipped(trainer: WorkerLoop, batch: dict[str, torch.Tensor]) -> None:
    """bf16/fp32: a batch that normalises to inf (std 0) gives a NaN loss; its step changes nothing, and the next
    step applies."""
    trainer.step(batch, 0.0)  # one good step first, so the optimizer has state to keep
    before, moments = parameters(trainer), optimizer_state(trainer)
    std = trainer.normalise.std.clone()
    trainer.normalise.std.zero_()
    loss, applied = trainer.step(batch, 0.0)
    assert not applied and not math.isfinite(loss)
    assert unchanged(before, parameters(trainer)) and unchanged(moments, optimizer_state(trainer))
    trainer.normalise.std.copy_(std)
    assert trainer.step(batch, 0.0)[1] and not unchanged(before, parameters(trainer))


def too_many_bad_steps_stop_the_epoch(trainer: WorkerLoop) -> str:
    """Every batch non-finite: after train.max_bad_steps of them the next one stops training, naming the step."""
    trainer.normalise.std.zero_()
    try:
        trainer.train_epoch(trainer.job.steps_per_epoch)
    except NonFiniteLossError as error:  # not kept: its traceback would keep the epoch's data iterator running
        return str(error)
    raise AssertionError("an epoch of non-finite steps went on")


def first_batch(trainer: WorkerLoop) -> dict[str, torch.Tensor]:
    batches = trainer._batches("train", drop_last=True)
    batch = next(batches)
    batches.close()  # ends the dataset's execution now rather than at garbage collection
    return batch


def numeric_faults_in_one_process(job: TrainJob) -> dict:
    """Runs under Ray Train's local mode (no worker processes), so the test reaches into the real WorkerLoop: its step
    function, optimizer, GradScaler and data, with faults injected into the loss scale and a batch's normalisation."""
    found = {}
    for precision in ("fp16", "bf16", "fp32"):
        job.config.train.precision = precision
        trainer = WorkerLoop(job)
        try:
            batch = first_batch(trainer)
            if precision == "fp16":
                found["overflow_steps_skipped"] = overflow_is_absorbed(trainer, batch)
            else:
                non_finite_step_is_skipped(trainer, batch)
                found[f"{precision}_stop"] = too_many_bad_steps_stop_the_epoch(trainer)
        finally:
            trainer.logger.close()
    return found


def test_fp16_overflow_and_non_finite_steps_are_skipped_until_too_many(ray_session, demo, tmp_path, run_overrides):
    overrides = faults_overrides(run_overrides, tmp_path, demo, "train.max_bad_steps=2")
    cfg = typed(resolve_paths(load_config(overrides=overrides), tmp_path))
    run_id = tracking.get_or_create_run(cfg.mlflow.tracking_uri, "mvit", "numerics", "numerics")
    built = build_trainer(cfg, plan_data(cfg), run_id)
    local = TorchTrainer(
        numeric_faults_in_one_process,
        train_loop_config=built.train_loop_config,
        datasets=built.datasets,
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(storage_path=str(tmp_path / "runs")),
    )
    found = local.fit().return_value
    assert found["overflow_steps_skipped"] >= 1
    for precision in ("bf16", "fp32"):
        # a fresh epoch of bad batches: the third is one more than train.max_bad_steps=2
        assert found[f"{precision}_stop"].startswith("stopped at step 3: steps 1-3 all had a non-finite loss")
        assert "\n" not in found[f"{precision}_stop"]
    summary("fp16-overflow", injected=1, steps_skipped=found["overflow_steps_skipped"], training_continued=1)
    summary("non-finite-step", injected=2, steps_skipped=2, training_continued=2, bad_streaks_stopped=2)


class WorkerSampler(threading.Thread):
    """Collects the pids of the Ray Train workers this process's Ray runs, to count worker group (re)starts."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.before = set(train_worker_pids(os.getpid()))
        self.seen: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.seen |= set(train_worker_pids(os.getpid())) - self.before
            time.sleep(0.2)


def stopped_run(cfg) -> tuple[str, set[int], float]:
    """Run `cfg`, which must stop on non-finite losses: (its message, the worker pids it used, seconds)."""
    sampler = WorkerSampler()
    sampler.start()
    began = time.monotonic()
    try:
        with pytest.raises(NonFiniteLossError) as raised:
            run_training(cfg)
    finally:
        sampler.stop.set()
        sampler.join()
    return str(raised.value), sampler.seen, time.monotonic() - began


@pytest.mark.timeout(600)  # with Ray's default failure policy this run restarts forever
def test_non_finite_losses_stop_a_run_at_once_into_a_new_mlflow_run_when_the_store_was_lost(
    ray_session, driver_scenario, tmp_path, capsys
):
    """Three faults in one resumed run: its MLflow store is gone (a new, empty one), `scaling.max_failures=-1`,
    and a learning rate of 1e30 (allowed as a recipe change) makes every step non-finite. The run continues in a
    new MLflow run tagged with the old id and says so; the non-finite stop is not retried although retries are
    unlimited; and the checkpoints stay byte-identical."""
    run_dir = driver_scenario.root / "runs" / "faults"
    before = {path: path.read_bytes() for path in run_dir.glob("checkpoint_*/state.pt")}
    _, last_good = latest_checkpoint(run_dir)
    epoch, step = last_good["loop"]["epoch"], last_good["loop"]["step"]
    recreated_store = f"sqlite:///{tmp_path / 'recreated.db'}"
    cfg = load_config(
        overrides=[
            *driver_scenario.overrides,
            f"train.epochs={epoch + 1}",
            "train.lr=1e30",
            "train.precision=bf16",
            "train.max_bad_steps=3",
            "scaling.max_failures=-1",
            "run.allow_recipe_change=true",
            f"mlflow.tracking_uri={recreated_store}",
        ]
    )
    message, workers, seconds = stopped_run(cfg)
    assert "\n" not in message, message
    stopped_at = int(re.match(r"stopped at step (\d+): steps \d+-\d+ all had a non-finite loss", message).group(1))
    assert stopped_at > step
    assert len(workers) == 2, f"worker processes: {sorted(workers)} (2 per attempt)"
    after = {path: path.read_bytes() for path in run_dir.glob("checkpoint_*/state.pt")}
    assert after == before
    # all but the one the scenario tore on purpose (if Ray Train has not rotated it out yet)
    for path in (path for path in after if path.parent != driver_scenario.torn_before_rerun):
        state = load_state(path.parent)
        assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())
    out = capsys.readouterr().out
    assert "recipe change allowed by run.allow_recipe_change: train.lr: 0.004 → 1e+30" in out
    client = MlflowClient(recreated_store)
    [new_run] = client.search_runs([client.get_experiment_by_name("mvit").experiment_id])
    old = driver_scenario.first_run_id
    assert f"MLflow run {old} of the checkpoint is not in the store at {recreated_store} (lost or recreated): " in out
    assert f"continuing in a new MLflow run {new_run.info.run_id}, tagged mvit.resumed_from_run_id={old}" in out
    assert new_run.data.tags["mvit.resumed_from_run_id"] == old and new_run.info.status == "FAILED"
    assert new_run.data.tags["mvit.resumed_at_step"] == str(step)
    summary(
        "non-finite-run",
        injected=1,
        runs_stopped_with_one_line_error=1,
        stopped_at_step=stopped_at,
        checkpoints_changed=sum(after[path] != before[path] for path in after),
        checkpoints_lost=0,
    )
    summary(
        "max-failures-unlimited-deterministic-error",
        injected=1,
        worker_group_starts=len(workers) // 2,
        restarts=len(workers) // 2 - 1,
        seconds_to_stop=round(seconds),
    )
    summary("lost-mlflow-store", injected=1, new_run_tagged_with_old_id=1, resume_failed=0)


def test_resume_latest_passes_over_a_corrupt_newest_checkpoint_then_refuses_changes_and_reruns(
    ray_session, driver_scenario, demo, capsys
):
    """The dead driver's newest checkpoint, cut in half before the rerun: `run.resume=latest` said which one it
    skipped and why, and continued from the one before. Then the same command says the finished run is finished and
    trains nothing; a changed recipe and changed data are refused in one line each, and so is a command without
    `run.resume` (a new run under a name that has checkpoints is never a silent no-op)."""
    scenario = driver_scenario
    torn = rf"skipped checkpoint {re.escape(str(scenario.torn_before_rerun))}: .*\(torn\)"
    assert re.search(torn, scenario.rerun.stdout), scenario.rerun.stdout[-6000:]
    step = scenario.resumed_from_step
    assert f"training from {scenario.resumed_from} (step {step})" in scenario.rerun.stdout
    # In this process, whose Ray workers can't see a password variable set now: the server's URL without one
    # (mlflow.* may change on resume).
    overrides = [*scenario.overrides, f"mlflow.tracking_uri={scenario.tracking_uri}"]
    run_dir = scenario.root / "runs" / "faults"
    again = run_training(load_config(overrides=overrides))
    assert again.result is None and f"run 'faults' is already finished: epoch {EPOCHS} of train.epochs={EPOCHS}" in (
        capsys.readouterr().out
    )
    with pytest.raises(ConfigError, match=r"the recipe of run 'faults' changed since .*: train.lr: 0.004 → 0.001;"):
        run_training(load_config(overrides=[*overrides, "train.lr=1e-3", f"train.epochs={EPOCHS + 1}"]))
    with pytest.raises(DataError, match=r"the data of run 'faults' changed since .* \(data.val: other content\)"):
        run_training(load_config(overrides=[*overrides, f"data.val={demo.train}", f"train.epochs={EPOCHS + 1}"]))
    refused = rf"run.name 'faults' already has \d+ checkpoint\(s\) in {re.escape(str(run_dir))}: continue it with "
    with pytest.raises(ConfigError, match=refused):
        run_training(load_config(overrides=[*overrides, "run.resume=''", f"train.epochs={EPOCHS + 1}"]))
    summary("corrupt-newest-checkpoint-on-resume", injected=1, skipped_and_named=1, resumed_from_step=step)
    summary("finished-run-rerun", injected=1, steps_trained=0, said_so=1)
    summary("new-run-under-a-used-name", injected=1, refused_with_one_line_error=1)


# ---- checkpoints and security -----------------------------------------------------------------------------------
WRITE_BIG_CHECKPOINT = """
import sys, torch
from pipeline.checkpoints import save_state
save_state(sys.argv[1], {"model": {"w": torch.ones(128 * 2**20)}, "loop": {"epoch": 2}})  # 512 MiB
"""


def crash_while_saving(folder: Path) -> int:
    """Start writing a 512 MiB checkpoint into `folder` in another process and SIGKILL it mid-write; returns how
    many bytes of the temporary file had been written."""
    writer = subprocess.Popen([sys.executable, "-c", WRITE_BIG_CHECKPOINT, str(folder)], cwd=REPO_ROOT)
    partial = folder / (STATE_FILE + ".tmp")
    try:
        while not (partial.exists() and partial.stat().st_size > 2**20):
            assert writer.poll() is None, "the writer finished before it could be killed"
            time.sleep(0.002)
        writer.kill()
        writer.wait()
    finally:
        if writer.poll() is None:
            writer.kill()
    return partial.stat().st_size


def test_a_crash_mid_write_never_leaves_a_checkpoint_that_loads_as_valid(tmp_path):
    fresh, rewritten = tmp_path / "fresh", tmp_path / "rewritten"
    good = save_state(rewritten, {"model": {"w": torch.zeros(10)}, "loop": {"epoch": 1}}).read_bytes()
    written = [crash_while_saving(fresh), crash_while_saving(rewritten)]
    with pytest.raises(CheckpointError, match="no state.pt"):
        load_state(fresh)
    assert (rewritten / STATE_FILE).read_bytes() == good
    assert load_state(rewritten)["loop"] == {"epoch": 1}
    summary(
        "checkpoint-crash-mid-write",
        injected=2,
        partial_bytes_written=min(written),
        loaded_as_valid=0,
        previous_checkpoints_lost=0,
    )


def fill_and_report(config: dict) -> None:
    """A Ray Train worker that reports `config["checkpoints"]` checkpoints of 4 MiB each (state.pt and manifest, as
    the training loop's Checkpointer writes them), uploaded the way `config["upload"]` says."""
    upload = upload_whole if config["upload"] == "whole" else None
    for number in range(config["checkpoints"]):
        with tempfile.TemporaryDirectory() as folder:
            save_state(folder, {"model": {"w": torch.full((2**20,), float(number))}}, {"loop": {"step": number}})
            ray.train.report(
                {"n": number}, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_upload_fn=upload
            )


@contextmanager
def small_file_system(folder: Path, megabytes: int) -> Iterator[Path]:
    """A real tmpfs of `megabytes` mounted at `folder` (needs root; skipped otherwise: the unit lane's RLIMIT_FSIZE
    test covers the same code anywhere)."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_while_checkpointing_leaves_each_checkpoint_whole_or_absent(ray_session, tmp_path):
    """Storage on a 10 MiB tmpfs, and three 4 MiB checkpoints: the third runs out of space mid-copy. With Ray
    Train's own upload a torn checkpoint stays in storage; with the run's upload, only the two whole ones do."""
    torn = {}
    with small_file_system(tmp_path / "storage", 10) as storage:
        for upload in ("ray-default", "whole"):
            trainer = TorchTrainer(
                fill_and_report,
                train_loop_config={"checkpoints": 3, "upload": upload},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=upload, storage_path=str(storage)),
            )
            with pytest.raises(ray.train.WorkerGroupError) as raised:
                trainer.fit()
            assert "No space left on device" in str(raised.value)
            folders = checkpoint_folders(storage / upload)
            torn[upload] = [folder.name for folder in folders if not _loads(folder)]
            if upload == "whole":
                assert len(folders) == 2 and torn[upload] == []
                assert not list((storage / upload).glob(".checkpoint_*"))  # no staging folder left
                assert "none was left" in str(raised.value)
            shutil.rmtree(storage / upload)
    assert torn["ray-default"], "Ray's own upload left no torn checkpoint: the fault was not reproduced"
    summary(
        "full-disk-while-checkpointing",
        injected=2,
        torn_in_storage_with_ray_default_upload=len(torn["ray-default"]),
        torn_in_storage_with_whole_upload=len(torn["whole"]),
    )


def _loads(folder: Path) -> bool:
    try:
        load_state(folder)
    except CheckpointError:
        return False
    return True


def torch_load_calls(root: Path) -> list[tuple[str, bool]]:
    """Every `torch.load(...)` call in the product code, and whether it passes weights_only=True."""
    calls = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(
                    keyword.arg == "weights_only" and ast.unparse(keyword.value) == "True" for keyword in node.keywords
                )
                calls.append((f"{path.relative_to(REPO_ROOT)}:{node.lineno}", safe))
    return calls


def test_every_checkpoint_is_read_with_weights_only():
    calls = [call for folder in ("mvit", "pipeline", "jobs") for call in torch_load_calls(REPO_ROOT / folder)]
    assert calls and [where for where, safe in calls if not safe] == []
