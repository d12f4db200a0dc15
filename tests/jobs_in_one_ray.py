"""Run several job commands in one process and one local Ray, as a user would one after another, without paying
Ray's start-up for each: `python tests/jobs_in_one_ray.py '[["prepare", [...]], ["train", [...]], ...]'`.

Prints `exit JOB CODE SECONDS` after each; stops at the first that fails. `["remove", [URI]]` deletes a file or
object between two commands (a video lost after it was indexed); `["wait", [URL]]` waits for a starting MLflow
server to answer (so that its start-up overlaps this process's). A test starts it as a subprocess when the jobs need
an environment of their own (its Ray workers inherit this process's environment, e.g. an S3 endpoint).
"""

from __future__ import annotations

import json
import sys
import time

import ray

from jobs import evaluate, prepare, train
from pipeline import storage
from tests.mlflow_server import wait_until_up

JOBS = {
    "prepare": prepare.main,
    "train": train.main,
    "evaluate": evaluate.main,
    "remove": lambda uris: [storage.remove(uri) for uri in uris] and 0,
    "wait": lambda urls: [wait_until_up(url) for url in urls] and 0,
}


def main() -> int:
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    try:
        for job, args in json.loads(sys.argv[1]):
            started = time.monotonic()
            code = JOBS[job](args)
            print(f"exit {job} {code} {time.monotonic() - started:.1f}", flush=True)
            if code:
                return code
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
