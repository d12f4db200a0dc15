"""`python -m jobs.benchmark demo`: the embedded default (`python -m jobs.train`) once per seed, its final val top-1
and wall time, and the classes its best epoch still got wrong.

Each seed runs the README's one command as a user would (a fresh process, demo generation skipped once it exists,
model logging included), with only `train.seed` changed and its run and MLflow store in a temporary folder, so the
figures are those of the command and not of a process that already imported everything.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FINAL = "final metrics: "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="default: %(default)s")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every run")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")


def run(args: argparse.Namespace) -> int:
    results = []
    for seed in args.seeds:
        results.append(_one_run(seed, args.set))
        result = results[-1]
        missed = ", ".join(f"{name} {accuracy:.2f}" for name, accuracy in result["best_epoch_missed"].items())
        print(
            f"seed {seed}: val/top1 {result['val/top1']:.4f}  wall {result['wall_s']:.0f} s  missed: {missed}",
            flush=True,
        )
    top1 = [result["val/top1"] for result in results]
    wall = [result["wall_s"] for result in results]
    print(f"val/top1 min {min(top1):.4f} median {statistics.median(top1):.4f} max {max(top1):.4f}")
    print(f"wall s   min {min(wall):.0f} median {statistics.median(wall):.0f} max {max(wall):.0f}")
    if args.json:
        args.json.write_text(json.dumps({"overrides": args.set, "runs": results}, indent=2))
    return 0


def _one_run(seed: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"demo-seed{seed}-") as folder:
        command = [sys.executable, "-m", "jobs.train", f"train.seed={seed}", f"run.storage_path={folder}/runs"]
        command += [f"mlflow.tracking_uri=sqlite:///{folder}/mlflow.db", *overrides]
        started = time.monotonic()
        finished = subprocess.run(command, capture_output=True, text=True)
        wall = time.monotonic() - started
        missed = _classes_missed(Path(folder))
    if finished.returncode != 0:
        raise SystemExit(f"seed {seed}: jobs.train exited {finished.returncode}: {finished.stderr.strip()[-2000:]}")
    line = next(line for line in finished.stdout.splitlines() if line.startswith(FINAL))
    metrics = ast.literal_eval(line[len(FINAL) :])
    return {"seed": seed, "wall_s": round(wall, 1), **metrics, "best_epoch_missed": missed}


def _classes_missed(folder: Path) -> dict[str, float]:
    """class → accuracy below 1 at the run's best epoch (its logged `best_epoch/per_class_accuracy.csv`)."""
    missed = {}
    for table in folder.glob("mlruns/**/best_epoch/per_class_accuracy.csv"):
        with table.open(newline="") as rows:
            missed |= {
                row["class"]: float(row["accuracy"]) for row in csv.DictReader(rows) if float(row["accuracy"]) < 1
            }
    return missed
