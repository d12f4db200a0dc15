"""Shared fixtures: one real local Ray per test session, shared data location, temporary MLflow stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """The real videos of ../shared/data/videos; tests that need them skip with a reason when absent."""
    folder = SHARED_DATA / "videos"
    if not folder.is_dir():
        pytest.skip(f"shared test videos not found at {folder}")
    return folder


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


@pytest.fixture()
def mlflow_uri(tmp_path: Path) -> str:
    """A fresh sqlite MLflow store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start their own cluster with `ray start` run first: `ray stop` ends every Ray on the machine,
    so they must finish before this session's own local Ray starts."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)


def pytest_configure(config: pytest.Config) -> None:
    # Keep Ray Data's progress output out of test logs; the product keeps it on.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
