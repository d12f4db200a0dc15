"""`python -m jobs.train [--config FILE] [key=value ...]`: train MViT on Ray (the demo dataset by default)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.cli import parse_config, print_config, run_job


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config("jobs.train", __doc__, argv)
    from pipeline.cluster import connect  # after the config check: a bad key exits at once
    from pipeline.training.driver import open_run, train

    def run() -> int:
        print_config(cfg)
        with open_run(cfg) as opened:  # named, locked and planned before Ray starts: a refusal takes a second
            connect(cfg.scaling.address, cfg.scaling.num_cpus)
            outcome = train(opened)
        shown = {k: round(v, 4) for k, v in outcome.metrics.items() if k.startswith("val/") or k == "epoch"}
        print(f"final metrics: {shown}")
        print(f"run: {outcome.run_name}")
        print(f"MLflow run id: {outcome.run_id}")
        print(f"Browse it: mlflow ui --backend-store-uri {outcome.shown_tracking_uri} --host 127.0.0.1 --port 5000")
        return 0

    return run_job("jobs.train", run)


if __name__ == "__main__":
    sys.exit(main())
