"""`python -m tests.cluster_node_loss INDEX OUT.json`: lose the only decode node of a `ray.cluster_utils.Cluster`
in the middle of an epoch, and write down what the epoch delivered.

It runs in its own process (and its own RAY_TMPDIR) because a process can join one Ray cluster only, and the test
session already has one. The head node has no `decode` resource, so every decode task runs on the second node. That
node is removed (its processes killed, the blocks in its object store lost) while a decode is under way, and a fresh
decode node joins, as an autoscaler would bring one. Ray's task retries and lineage reconstruction must redo the
lost work.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid

import ray
from ray.cluster_utils import Cluster

from pipeline.data import dataset
from pipeline.data.sampling import ClipSpec
from pipeline.data.skips import SkipCounters, skip_counter
from tests.clips import decode_tasks, train_transform

NODE_MEMORY = {"object_store_memory": 100 * 1024**2}
DECODE_NODE = {"num_cpus": 2, "resources": {"decode": 2}, **NODE_MEMORY}


def lose_node_while_decoding(cluster: Cluster, node: ray._private.node.Node, counter: SkipCounters) -> int:
    """Remove `node` as soon as the skip counter shows a decode task under way (all run there), then replace it
    (from the main thread: starting a node installs signal handlers). Returns how many decodes were under way."""

    def under_way() -> dict:
        parts = ray.get([shard.__ray_call__.remote(lambda shard: dict(shard._running)) for shard in counter.shards])
        return {task: noted for part in parts for task, noted in part.items()}

    while not (in_progress := under_way()):
        time.sleep(0.002)
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(**DECODE_NODE)
    return len(in_progress)


def main(index: str, out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **NODE_MEMORY})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        counter_name = f"node-loss-{uuid.uuid4().hex}"
        tasks = decode_tasks(resources={"decode": 1}, videos_per_task=1, skip_counter=counter_name)
        transform = train_transform(short_side=(32, 40))
        spec = ClipSpec(8, 2, 30.0)
        clips = dataset.train_dataset(index, spec=spec, transform=transform, num_clips=1, tasks=tasks, seed=0, epoch=0)
        counter = skip_counter(counter_name)  # on the head: the dataset above created it before the node joined
        doomed = cluster.add_node(**DECODE_NODE)
        labels: list[int] = []
        started = time.monotonic()
        epoch = threading.Thread(target=lambda: labels.extend(int(row["label"]) for row in clips.iter_rows()))
        epoch.start()
        under_way = lose_node_while_decoding(cluster, doomed, counter)
        epoch.join()
        facts = {
            "labels": labels,
            "decodes_under_way_at_loss": under_way,
            "seconds": time.monotonic() - started,
            "skipped": counter.reasons(),
        }
        with open(out, "w") as handle:
            json.dump(facts, handle)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
