"""`python -m jobs.evaluate model=... data.test=... [key=value ...]`: K×S-view testing of a model, as in the paper.

Prints top-1, top-5 and mean per-class accuracy over the videos that decoded, names every video it could not use
(those are excluded from the totals, never counted wrong), and logs all of it to a new MLflow evaluation run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.cli import overridden_keys, parse_config


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config("jobs.evaluate", __doc__, argv, evaluation=True)
    from pipeline.evaluation import run_evaluation  # after the config check: a bad key exits at once
    from pipeline.model_source import ModelSourceError
    from pipeline.trainer import ensure_ray

    ensure_ray(cfg)
    try:
        report = run_evaluation(cfg, overridden_keys(argv), Path.cwd())
    except (ModelSourceError, ValueError, FileNotFoundError) as error:
        print(f"jobs.evaluate: error: {error}", file=sys.stderr)
        return 1
    result = report.result
    print(f"model: {report.loaded.description}")
    print(f"views per video: {cfg.data.test_clips} clips x {cfg.data.test_crops} crops")
    print(f"videos evaluated: {result.videos}")
    print(f"top1: {result.top1:.4f}  top5: {result.top5:.4f}  mean class accuracy: {result.mean_class_accuracy:.4f}")
    unusable = [*report.excluded, *report.skipped.items()]
    if unusable:
        print(f"excluded from the totals ({len(unusable)} unusable videos):")
        for path, reason in unusable:
            print(f"  {path}: {reason}")
    print(f"MLflow evaluation run id: {report.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
