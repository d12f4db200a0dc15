"""One driver per run: a lock file in the run's folder, naming its holder, refreshed while the holder lives.

Two drivers with one `run.name` would train into one set of checkpoints and one MLflow run, each logging the other's
steps again. The second is refused while the first holds the lock. A lock is stale, and taken over with a note,
when its holder was on this host and its process is gone (a killed driver), or when it was on another host and has
not been refreshed for `STALE_AFTER_S` (the holder refreshes it every `HEARTBEAT_S`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from pipeline.errors import ConfigError

LOCK_FILE = ".run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _this_process() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_started": psutil.Process().create_time(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _holder_is_alive(holder: dict[str, Any], lock: Path) -> bool:
    if holder.get("host") != socket.gethostname():
        return time.time() - lock.stat().st_mtime < STALE_AFTER_S
    try:
        process = psutil.Process(holder["pid"])
        return abs(process.create_time() - holder["process_started"]) < 1.0  # not a reused pid
    except (psutil.NoSuchProcess, KeyError, TypeError):
        return False


class RunLock:
    """Held by the driver from before it writes anything into the run folder until training ends."""

    def __init__(self, run_dir: Path, run_name: str) -> None:
        self.path = run_dir / LOCK_FILE
        self.run_name = run_name
        self.holder = _this_process()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.note: str | None = None  # set when a stale lock was taken over

    def __enter__(self) -> RunLock:
        self.note = self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over, raises ConfigError if it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(5):
            try:
                with open(self.path, "x") as handle:
                    json.dump(self.holder, handle)
            except FileExistsError:
                note = self._take_over_if_stale() or note
                continue
            self._heartbeat = threading.Thread(target=self._beat, daemon=True, name=f"run-lock-{self.run_name}")
            self._heartbeat.start()
            return note
        raise ConfigError(f"run.name '{self.run_name}': could not take {self.path} (contended)")

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}  # being written right now, or gone

    def _take_over_if_stale(self) -> str | None:
        holder = self._read(self.path)
        try:
            # An unreadable lock is being written right now, unless it has been so for a while (a writer that died).
            alive = _holder_is_alive(holder, self.path) if holder else time.time() - self.path.stat().st_mtime < 10
        except FileNotFoundError:
            return None  # released meanwhile: try again
        if alive:
            raise ConfigError(
                f"run.name '{self.run_name}': in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"since {holder.get('since', '?')} ({self.path}); wait for it to end, or choose another run.name"
            )
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return None
        if self._read(aside) != holder:  # another driver took it over first: put its lock back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return None
        aside.unlink(missing_ok=True)
        return f"took over the lock of pid {holder.get('pid')} on {holder.get('host')}, which is no longer running"

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
            if self._read(self.path) == self.holder:
                self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a run that never got to write anything leaves no folder behind
                self.path.parent.rmdir()
