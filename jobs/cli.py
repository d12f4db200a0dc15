"""What every job shares: `[--config FILE] key=value ...` into a validated config, and the one error policy.

A `UserError` (bad config, data, model, a run that stopped itself) ends a job with one line on stderr and the
error kind's exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.config import flatten, load_config
from pipeline.errors import UserError
from pipeline.secrets import public_config


def run_job(prog: str, body: Callable[[], int]) -> int:
    """Run a job's body; a user error becomes `prog: error: ...` on stderr and the exit code of its kind."""
    try:
        return body()
    except UserError as error:
        print(f"{prog}: error: {storage.scrub(str(error))}", file=sys.stderr)  # no credentials of a URI in it
        return error.exit_code


def config_or_exit(
    prog: str, config_file: str | None, overrides: Sequence[str], evaluation: bool = False
) -> DictConfig:
    try:
        return load_config(config_file, overrides, evaluation=evaluation)
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None


def parse_config(
    prog: str, description: str, argv: Sequence[str] | None = None, evaluation: bool = False
) -> DictConfig:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="a recipe YAML merged over the defaults in conf/")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    return config_or_exit(prog, args.config, args.overrides, evaluation)


def explicit_keys(argv: Sequence[str]) -> set[str]:
    """The keys a user set, in a `--config` file or as `key=value`: they win over the values a checkpoint carries."""
    keys = {item.split("=", 1)[0] for item in argv if "=" in item and not item.startswith("-")}
    config_file = _config_file(argv)
    if config_file is not None and Path(config_file).is_file():
        keys |= set(flatten(OmegaConf.to_container(OmegaConf.load(config_file))))
    return keys


def _config_file(argv: Sequence[str]) -> str | None:
    for position, item in enumerate(argv):
        if item == "--config" and position + 1 < len(argv):
            return argv[position + 1]
        if item.startswith("--config="):
            return item.split("=", 1)[1]
    return None


def print_config(cfg: DictConfig) -> None:
    """The config as given, credentials removed and environment interpolations left unresolved."""
    print("# config\n" + OmegaConf.to_yaml(public_config(cfg)), flush=True)
