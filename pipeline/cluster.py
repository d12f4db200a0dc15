"""Connecting to Ray: join the cluster a job was pointed at, or start a local one sized by the config."""

from __future__ import annotations

import ray


def existing_cluster(address: str | None) -> str | None:
    """The cluster `ray.init` would join: `address`, else RAY_ADDRESS (as under `ray job submit`), else the one
    `ray start` last started on this machine (its address file in Ray's temp dir); None when there is none."""
    if address:
        return address
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None)


def connect(address: str | None, num_cpus: int | None, **options: object) -> None:
    """Join an existing cluster (see `existing_cluster`), else start a local Ray of `num_cpus` CPUs.

    `num_cpus` is never passed to a cluster that exists: its size is the cluster's own (Ray refuses it).
    `options` go to `ray.init` either way (e.g. `log_to_driver`).
    """
    if ray.is_initialized():
        return
    found = existing_cluster(address)
    if found:
        print(f"joining the Ray cluster at {found}", flush=True)
        ray.init(address=found, **options)
    else:
        ray.init(num_cpus=num_cpus, **options)
