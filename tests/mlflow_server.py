"""A real `mlflow server` for tests: its own sqlite store, its artifacts in a folder or a bucket, on a free port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

PASSWORD_VARIABLE = "FAULTS_MLFLOW_PASSWORD"


@dataclass
class TrackingServer:
    """The server (no auth app: it accepts any credentials), and a password that runs may put in their tracking URI
    so that a test can check it is written and printed nowhere."""

    url: str  # without credentials, for the test's own client
    process: subprocess.Popen
    password: str
    root: Path  # its store and log (and its artifacts, unless they go to a bucket)

    @property
    def uri_with_password(self) -> str:
        """How the runs are told to reach it: user and password in the URI, the password from the environment."""
        return self.url.replace("http://", f"http://faults:${{oc.env:{PASSWORD_VARIABLE}}}@")

    def wait(self, timeout: float = 300) -> str:
        def alive() -> None:
            assert self.process.poll() is None, f"mlflow server exited: {(self.root / 'server.log').read_text()}"

        return wait_until_up(self.url, timeout, alive)


def wait_until_up(url: str, timeout: float = 300, alive: Callable[[], None] = lambda: None) -> str:
    """`url` once the MLflow server there answers its health check with 200; `alive()` is called between tries
    (to fail at once if the server is gone); raises after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return url
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server {url} not up within {timeout} s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def tracking_server(root: Path, artifacts: str, env: dict[str, str] | None = None) -> Iterator[TrackingServer]:
    """`mlflow server` keeping its artifacts at `artifacts` (a folder, or a bucket URI the server writes with the
    credentials of `env`), started at once and waited for with `wait()` (its start-up takes tens of seconds on 2
    cores: start it before other slow set-up), killed with its workers at the end."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    command += ["--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield TrackingServer(f"http://127.0.0.1:{port}", process, uuid.uuid4().hex, root)
    finally:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
        process.wait()
