"""`python -m jobs.benchmark {model,data,pipeline,scale,transcode,storage,augment,demo,gpu-check} ...`: speed and
size figures (BENCHMARKS.md records them)."""

from __future__ import annotations

import argparse
import sys

from jobs.benchmark import augment, data, demo, gpu_check, model, pipeline, scale, storage, transcode


def main() -> int:
    parser = argparse.ArgumentParser(prog="jobs.benchmark", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in (
        ("model", model),
        ("data", data),
        ("pipeline", pipeline),
        ("scale", scale),
        ("transcode", transcode),
        ("storage", storage),
        ("augment", augment),
        ("demo", demo),
        ("gpu-check", gpu_check),
    ):
        sub = commands.add_parser(name, help=module.__doc__.splitlines()[0] if module.__doc__ else name)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
