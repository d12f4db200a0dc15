"""`python -m jobs.train [--config FILE] [key=value ...]`: train MViT on Ray (the demo dataset by default)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.cli import parse_config, print_config


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config("jobs.train", __doc__, argv)
    from pipeline.train_loop import NonFiniteLossError
    from pipeline.trainer import ensure_ray, run_training  # after the config check: a bad key exits at once

    print_config(cfg)
    ensure_ray(cfg)
    try:
        outcome = run_training(cfg)
    except (ValueError, NonFiniteLossError) as error:  # bad data or settings (manifests raise ValueErrors), or a
        print(f"jobs.train: error: {error}", file=sys.stderr)  # run stopped by non-finite losses: one line each
        return 1
    shown = {k: round(v, 4) for k, v in outcome.metrics.items() if k.startswith("val/") or k == "epoch"}
    print(f"final metrics: {shown}")
    print(f"MLflow run id: {outcome.run_id}")
    print(f"Browse it: mlflow ui --backend-store-uri {outcome.tracking_uri} --host 127.0.0.1 --port 5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
