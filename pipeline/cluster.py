"""Connecting to Ray: join the cluster a job was pointed at, or start a local one sized by the config."""

from __future__ import annotations

import os

import ray


def connect(address: str | None, num_cpus: int | None) -> None:
    """Join `address` or RAY_ADDRESS (as under `ray job submit`), else start a local Ray of `num_cpus` CPUs.

    `num_cpus` is never passed to a cluster that exists: its size is the cluster's own.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus)
