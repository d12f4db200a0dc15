"""`python -m jobs.predict VIDEO... [model=...] [top_k=5] [--json]`: the top-k labels of each video.

Each video is scored the way `jobs.evaluate` scores it (data.test_clips × data.test_crops views, softmax averaged),
in this process: no Ray is needed. A file that is missing or does not decode is reported by name and skipped; the
exit code is 1 if any was.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobs.cli import config_or_exit, overridden_keys


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
    import torch  # after the config check: a bad key exits at once

    from pipeline.inference import clip_settings, model_reference, video_views
    from pipeline.model_source import ModelSourceError, load_model
    from pipeline.train_loop import normalise
    from pipeline.video import VideoDecodeError

    try:
        loaded = load_model(**model_reference(cfg, Path.cwd()))
    except ModelSourceError as error:
        print(f"jobs.predict: error: {error}", file=sys.stderr)
        return 1
    settings = clip_settings(cfg, loaded, overridden_keys(overrides))
    mean = torch.tensor(settings.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(settings.std).view(1, 3, 1, 1, 1)
    top_k = min(cfg.top_k, len(loaded.labels))
    results: list[dict[str, Any]] = []
    for video in videos:
        try:
            views = video_views(video, settings, cfg.data.test_clips, cfg.data.test_crops)
        except VideoDecodeError as error:
            results.append({"video": video, "error": error.reason})
            continue
        with torch.inference_mode():
            logits = loaded.module(normalise(torch.from_numpy(views), mean, std))
            scores = torch.softmax(logits.float(), dim=-1).mean(dim=0)
        probabilities, classes = scores.topk(top_k)
        top = [(loaded.labels[c], round(float(p), 6)) for p, c in zip(probabilities.tolist(), classes.tolist())]
        results.append({"video": video, "top": top})
    if args.json:
        print(
            json.dumps(
                {
                    "model": loaded.description,
                    "results": [
                        {**r, "top": [{"label": label, "probability": p} for label, p in r.get("top", [])]}
                        for r in results
                    ],
                },
                indent=2,
            )
        )
    else:
        print(_table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
