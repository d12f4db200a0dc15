"""Shared fixtures: one real local Ray per test session, the demo dataset, training overrides, MLflow stores, a
local S3 server.

Lanes: every test that uses `ray_session` (directly or through another fixture) or is marked `ray`, `cluster` or
`faults` starts Ray; `slow` ones (torch.compile, full-size peer models) take long without it; every other test is marked
`unit` here, so `pytest -m unit` is the fast loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.data.demo import DemoDataset, make_demo_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"
NOT_UNIT = ("ray", "cluster", "faults", "slow")


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """The real videos of ../shared/data/videos; tests that need them skip with a reason when absent."""
    folder = SHARED_DATA / "videos"
    if not folder.is_dir():
        pytest.skip(f"shared test videos not found at {folder}")
    return folder


@dataclass
class LocalS3:
    """moto's S3 server on 127.0.0.1 behind the counting, fault-injecting proxy that every request goes through."""

    server: Any  # jobs.benchmark.local_s3.MotoServer
    proxy: Any  # jobs.benchmark.local_s3.FaultProxy
    env: dict[str, str]  # what a subprocess (and its Ray workers) needs to reach it

    def bucket(self, name: str) -> str:
        """A new, empty bucket; its URI."""
        import boto3

        boto3.client("s3", endpoint_url=self.server.url).create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """A real S3-compatible server for the session (moto's server mode), reached as any S3 endpoint is: through
    `AWS_ENDPOINT_URL` and dummy credentials in this process's environment (restored at the end)."""
    from jobs.benchmark.local_s3 import FaultProxy, MotoServer

    server = MotoServer(log=tmp_path_factory.mktemp("s3") / "moto.log")
    proxy = FaultProxy(server.url)
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")  # no ~/.aws of whoever runs the tests
    env = {
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": nowhere,
        "AWS_SHARED_CREDENTIALS_FILE": nowhere,
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield LocalS3(server, proxy, env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proxy.stop()
        server.stop()


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session, told of 4 logical CPUs so Train workers and Data tasks both fit."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            # tests/ too: pytest imports test modules by their bare names, and train functions defined in a test
            # module are pickled by reference to them
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def make_demo(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., DemoDataset]:
    """`make_demo(**settings)`: a demo dataset of `make_demo_dataset`, written once per session per settings."""
    made: dict[tuple, DemoDataset] = {}

    def make(**settings: object) -> DemoDataset:
        key = tuple(sorted(settings.items()))
        if key not in made:
            made[key] = make_demo_dataset(tmp_path_factory.mktemp("demo"), **settings)
        return made[key]

    return make


@pytest.fixture(scope="session")
def demo(make_demo: Callable[..., DemoDataset]) -> DemoDataset:
    """The small demo most tests share: 8 classes, 4 training videos and 1 validation video each."""
    return make_demo(seed=0, videos_per_class=5)


def _training_overrides(root: Path, train: Path | str, val: Path | str, *extra: str) -> list[str]:
    """`key=value`s of a small 2-worker mvit_tiny run on these manifests (or indexes), writing under `root`.

    Batches of 4, a train/loss at every step, no system metrics; `extra` overrides win (the last of a key counts).
    """
    return [
        f"data.train={train}",
        f"data.val={val}",
        f"run.storage_path={root / 'runs'}",
        "run.name=test",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"data.index_cache={root / 'index_cache'}",
        "mlflow.system_metrics=false",
        "train.batch_size=4",
        "train.log_every_steps=1",
        *extra,
    ]


@pytest.fixture(scope="session")
def run_overrides() -> Callable[..., list[str]]:
    """`run_overrides(root, train, val, *extra)`: see :func:`_training_overrides`."""
    return _training_overrides


REGISTERED_MODEL = "mvit-test"


@pytest.fixture(scope="session")
def tracked_run(ray_session, tmp_path_factory, demo, run_overrides):
    """One 3-epoch run of 2 DDP workers on the demo that logs and registers its models: `(outcome, root)`.

    Shared because a Ray Train run costs about a minute here: `test_train` checks what the run recorded,
    `test_logged_models` what its models are (its evaluations add runs beside it, never change it)."""
    from pipeline.config import load_config
    from pipeline.training.driver import run_training

    root = tmp_path_factory.mktemp("tracked")
    overrides = run_overrides(
        root,
        demo.train_manifest,
        demo.val_manifest,
        "train.epochs=3",
        "train.lr=4e-3",
        "mlflow.log_models=true",
        f"mlflow.registered_model_name={REGISTERED_MODEL}",
    )
    return run_training(load_config(overrides=overrides)), root


@pytest.fixture()
def mlflow_uri(tmp_path: Path) -> str:
    """A fresh sqlite MLflow store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the unit lane. (Tests that `ray start` a cluster stop only their own processes, never with `ray stop`,
    which would end every Ray on the machine: they may run in any order.)"""
    for item in items:
        if "ray_session" not in item.fixturenames and not any(item.get_closest_marker(m) for m in NOT_UNIT):
            item.add_marker(pytest.mark.unit)


def pytest_configure(config: pytest.Config) -> None:
    # Keep Ray Data's progress output out of test logs; the product keeps it on.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
