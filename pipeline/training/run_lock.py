"""One driver per run: a lock file in the run's folder, naming its holder, refreshed while the holder lives.

Two drivers with one `run.name` would train into one set of checkpoints and one MLflow run, each logging the other's
steps again. The second is refused while the first holds the lock. A lock is stale, and taken over with a note,
when its holder was on this host and its process is gone (a killed driver), or when it was on another host and has
not been refreshed for `STALE_AFTER_S` (the holder refreshes it every `HEARTBEAT_S`).

In object storage (`run.storage_path=s3://...`) the lock is an object (`ObjectRunLock`), with the same holder,
staleness and heartbeat rules; an object store has no create-if-absent here, so two drivers started within the same
second may both pass it: it guards against a second command on a live run, not against a simultaneous start.
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

from pipeline import storage
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
    return _process_is_alive(holder)


def _process_is_alive(holder: dict[str, Any]) -> bool:
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


class ObjectRunLock:
    """`RunLock` for a run folder in object storage: the lock is an object, its heartbeat a rewrite of it."""

    def __init__(self, run_dir: str, run_name: str) -> None:
        self.path, self.run_name = storage.join(run_dir, LOCK_FILE), run_name
        self.holder = _this_process()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.note: str | None = None

    def __enter__(self) -> ObjectRunLock:
        self.note = self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _read(self) -> tuple[dict[str, Any], float] | None:
        found = storage.info(self.path)
        if found is None:
            return None
        try:
            holder = json.loads(storage.read_text(self.path))
        except (storage.StorageError, ValueError):
            holder = {}
        return holder, (found.mtime_ns or 0) / 1e9

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over, raises ConfigError if it is held."""
        note, found = None, self._read()
        if found is not None:
            holder, written = found
            alive = _process_is_alive(holder) if holder.get("host") == socket.gethostname() else None
            if alive or (alive is None and time.time() - written < STALE_AFTER_S):
                raise ConfigError(
                    f"run.name '{self.run_name}': in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                    f"since {holder.get('since', '?')} ({self.path}); wait for it to end, or choose another run.name"
                )
            note = f"took over the lock of pid {holder.get('pid')} on {holder.get('host')}, which is no longer running"
        storage.write_text(self.path, json.dumps(self.holder))
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name=f"run-lock-{self.run_name}")
        self._heartbeat.start()
        return note

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                storage.write_text(self.path, json.dumps(self.holder))
            except storage.StorageError:
                continue  # a passing outage: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
            found = self._read()
            if found is not None and found[0] == self.holder:
                storage.remove(self.path)


def run_lock(run_dir: str | Path, run_name: str) -> RunLock | ObjectRunLock:
    """The lock of the run folder `run_dir`, local or in object storage."""
    return ObjectRunLock(str(run_dir), run_name) if storage.is_uri(run_dir) else RunLock(Path(run_dir), run_name)
