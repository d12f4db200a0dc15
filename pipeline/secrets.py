"""Secrets in a config: what may be written or printed, and what only the process that uses it may resolve.

Two kinds of secret reach a config. Credentials inside a URI (`http://user:password@host`, `?token=...`) are
removed wherever the config is written or printed, as are the values of secret-named keys. Values that come from an
environment interpolation (`${oc.env:MLFLOW_TOKEN}`) are never resolved into anything written, printed or sent to
the workers: those keys travel as their interpolation text and each worker resolves them from its own environment.
Paths are the exception, since the driver must make them absolute before the workers see them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from copy import deepcopy
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from omegaconf import DictConfig, OmegaConf

from pipeline.config import flatten
from pipeline.errors import ConfigError

SECRET_NAME = re.compile(r"(password|passwd|secret|token|api[_-]?key|access[_-]?key|credential|signature)", re.I)
ENV_INTERPOLATION = re.compile(r"\$\{(oc\.env|env):")
MASK = "***"

Config = TypeVar("Config")


def redact(value: Any) -> Any:
    """A URI-like string without `user:password@` and with secret-named query values masked; anything else as is.

    Only those parts are rewritten, in place: rebuilding the URI would change others (`sqlite:////abs` → `//abs`).
    """
    if not isinstance(value, str) or "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        value = value.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(SECRET_NAME.search(key) for key, _ in pairs):
        masked = urlencode([(key, MASK if SECRET_NAME.search(key) else item) for key, item in pairs], safe="*")
        value = value.replace(f"?{parts.query}", f"?{masked}", 1)
    return value


def shown(key: str, value: Any) -> Any:
    """What of `value` at `key` may be written or printed."""
    if SECRET_NAME.search(key.rsplit(".", 1)[-1]) and value:
        return MASK
    return redact(value)


def env_keys(raw: DictConfig) -> set[str]:
    """The flat keys whose value, as the user wrote it, holds an environment interpolation."""
    flat = flatten(OmegaConf.to_container(raw, resolve=False))
    return {key for key, value in flat.items() if isinstance(value, str) and ENV_INTERPOLATION.search(value)}


def _raw(raw: DictConfig, key: str) -> str:
    return flatten(OmegaConf.to_container(raw, resolve=False))[key]


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def public_config(raw: DictConfig, resolved: Any = None) -> dict[str, Any]:
    """The config as it may be written (config.yaml, checkpoints, MLflow params) or printed: `resolved` (a dataclass
    tree or mapping; default: `raw` itself, unresolved), with environment interpolations kept as their text and
    credentials removed."""
    if resolved is None:
        values = flatten(OmegaConf.to_container(raw, resolve=False))
    else:
        values = flatten(dataclasses.asdict(resolved) if dataclasses.is_dataclass(resolved) else dict(resolved))
    from_env = env_keys(raw)
    flat = {key: shown(key, _raw(raw, key) if key in from_env else value) for key, value in values.items()}
    return _nest(flat)


def for_workers(raw: DictConfig, resolved: Config, keep_resolved: Iterable[str]) -> Config:
    """A copy of the typed `resolved` config in which every environment-interpolated string (except the keys of
    `keep_resolved`, the paths) holds its interpolation text again, for `resolve_on_worker`."""
    copy = deepcopy(resolved)
    for key in sorted(env_keys(raw) - set(keep_resolved)):
        *parents, leaf = key.split(".")
        node: Any = copy
        for parent in parents:
            node = node[parent] if isinstance(node, dict) else getattr(node, parent)
        if isinstance(node, dict) or not isinstance(getattr(node, leaf), str):
            continue  # numbers, flags and resource maps are no secrets
        if key == "mlflow.tracking_uri" and getattr(node, leaf) != OmegaConf.select(raw, key):
            raise ConfigError(f"config key '{key}': a URI from the environment must be absolute (sqlite:////...)")
        setattr(node, leaf, _raw(raw, key))
    return copy


def resolve_on_worker(config: Config) -> Config:
    """The worker's config with its environment interpolations resolved from this process's environment."""
    try:
        return OmegaConf.to_object(OmegaConf.structured(config))
    except Exception as error:  # an unset variable: name the key, not OmegaConf's traceback
        raise ConfigError(f"config: {str(error).splitlines()[0]} (set it in the environment of every node)") from None
