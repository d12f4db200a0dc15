"""`python -m jobs.predict VIDEO... [model=...] [top_k=5] [--json]`: the top-k labels of each video.

Each video is scored the way `jobs.evaluate` scores it (data.test_clips × data.test_crops views, softmax averaged),
in this process: no Ray is needed. A file that is missing or does not decode is reported by name and skipped; the
exit code is then 3 (a data error).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from jobs.cli import config_or_exit, explicit_keys, run_job
from pipeline.config import typed
from pipeline.data.transforms import Normalise
from pipeline.data.video import VideoDecodeError
from pipeline.errors import DataError
from pipeline.evaluation.loading import load_model
from pipeline.evaluation.views import clip_settings, model_reference, video_views


def _split(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
    """Videos and key=value overrides; an argument that names an existing file is a video even if it holds '='."""
    videos, overrides = [], []
    for argument in arguments:
        (overrides if "=" in argument and not Path(argument).exists() else videos).append(argument)
    return videos, overrides


def _table(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        lines.append(result["video"])
        if "error" in result:
            lines.append(f"  error: {result['error']}")
        for rank, (label, probability) in enumerate(result.get("top", []), start=1):
            lines.append(f"  {rank}. {probability:7.2%}  {label}")
    return "\n".join(lines)


def _score(videos: list[str], cfg: DictConfig, explicit: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """The model's description, and per video its top-k (label, probability) or the reason it was skipped."""
    settings_cfg = typed(cfg)
    loaded = load_model(model_reference(settings_cfg, Path.cwd()))
    settings = clip_settings(settings_cfg, loaded, explicit)
    normalise = Normalise(settings.mean, settings.std)
    top_k = min(cfg.top_k, len(loaded.labels))
    results: list[dict[str, Any]] = []
    for video in videos:
        try:
            views = video_views(video, settings, cfg.data.test_clips, cfg.data.test_crops)
        except VideoDecodeError as error:
            results.append({"video": video, "error": error.reason})
            continue
        with torch.inference_mode():
            scores = torch.softmax(loaded.module(normalise(torch.from_numpy(views))).float(), dim=-1).mean(dim=0)
        probabilities, classes = scores.topk(top_k)
        top = [(loaded.labels[c], round(float(p), 6)) for p, c in zip(probabilities.tolist(), classes.tolist())]
        results.append({"video": video, "top": top})
    return loaded.description, results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs.predict", description=__doc__)
    parser.add_argument("--config", help="a recipe YAML merged over the defaults in conf/")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("arguments", nargs="+", metavar="VIDEO | key=value")
    args = parser.parse_args(argv)
    videos, overrides = _split(args.arguments)
    if not videos:
        parser.error("no video given")
    cfg = config_or_exit("jobs.predict", args.config, overrides, evaluation=True)

    def predict() -> int:
        config_file = ["--config", args.config] if args.config else []
        description, results = _score(videos, cfg, explicit_keys([*overrides, *config_file]))
        if args.json:
            shown = [
                {**r, "top": [{"label": label, "probability": p} for label, p in r.get("top", [])]} for r in results
            ]
            print(json.dumps({"model": description, "results": shown}, indent=2))
        else:
            print(_table(results))
        return DataError.exit_code if any("error" in r for r in results) else 0

    return run_job("jobs.predict", predict)


if __name__ == "__main__":
    sys.exit(main())
