"""Shared command-line handling: `[--config FILE] key=value ...` into a validated config, or a one-line exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError, load_config


def parse_config(prog: str, description: str, argv: Optional[Sequence[str]] = None) -> DictConfig:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="a recipe YAML merged over conf/default.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def print_config(cfg: DictConfig) -> None:
    print("# resolved config\n" + OmegaConf.to_yaml(cfg), flush=True)
