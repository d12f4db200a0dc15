"""`python -m jobs.evaluate model=... data.test=... [key=value ...]`: K×S-view testing of a model, as in the paper.

Prints top-1, top-5 and mean per-class accuracy over the videos that decoded, names every video it could not use
(those are excluded from the totals, never counted wrong), and logs all of it to a new MLflow evaluation run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.cli import explicit_keys, parse_config, run_job


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config("jobs.evaluate", __doc__, argv, evaluation=True)
    from pipeline.cluster import connect  # after the config check: a bad key exits at once
    from pipeline.config import typed
    from pipeline.evaluation.batch import run_evaluation

    def evaluate() -> int:
        connect(cfg.scaling.address, cfg.scaling.num_cpus)
        report = run_evaluation(typed(cfg), explicit_keys(argv), Path.cwd())
        result = report.result
        print(f"model: {report.loaded.description}")
        print(f"views per video: {cfg.data.test_clips} clips x {cfg.data.test_crops} crops")
        print(f"videos evaluated: {result.videos}")
        print(
            f"top1: {result.top1:.4f}  top5: {result.top5:.4f}  mean class accuracy: {result.mean_class_accuracy:.4f}"
        )
        unusable = [*report.excluded, *report.skipped.items()]
        if unusable:
            print(f"excluded from the totals ({len(unusable)} unusable videos):")
            for path, reason in unusable:
                print(f"  {path}: {reason}")
        print(f"MLflow evaluation run id: {report.run_id}")
        return 0

    return run_job("jobs.evaluate", evaluate)


if __name__ == "__main__":
    sys.exit(main())
