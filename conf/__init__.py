"""The OmegaConf recipe files: `default.yaml` (the embedded demo) and recipes merged over it with `--config`."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
