"""The training config: the embedded defaults load, recipes merge, and bad keys or values exit 2 in one line."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from pipeline.config import ConfigError, flatten, load_config
from tests.conftest import REPO_ROOT

REQUIRED_KEYS = [
    "model.name",
    "model.num_classes",
    "model.pretrained",
    "data.train",
    "data.val",
    "data.root",
    "data.num_frames",
    "data.sampling_rate",
    "data.crop_size",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.precision",
    "scaling.num_workers",
    "scaling.use_gpu",
    "scaling.cpus_per_worker",
    "scaling.max_failures",
    "run.name",
    "run.storage_path",
    "mlflow.tracking_uri",
    "mlflow.experiment",
]


def test_default_config_has_every_required_key():
    flat = flatten(OmegaConf.to_container(load_config()))
    assert set(REQUIRED_KEYS) <= set(flat)


def test_paper_recipe_merges_over_defaults():
    cfg = load_config(REPO_ROOT / "conf" / "kinetics400_mvit_b_16x4.yaml", ["train.epochs=3"])
    assert (cfg.model.name, cfg.data.num_frames, cfg.data.sampling_rate) == ("mvit_b_16x4", 16, 4)
    assert cfg.train.lr == pytest.approx(1.6e-3) and cfg.train.lr_reference_batch == 512
    assert cfg.train.epochs == 3


@pytest.mark.faults
@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lr=fast", "train.lr"),
        ("train.epochz=3", "train.epochz"),
        ("model.nmae=x", "model.nmae"),
        ("train.precision=fp8", "train.precision"),
        ("data.num_frames=0", "data.num_frames"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu"),
    ],
)
def test_bad_override_names_the_key(override, named):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    message = str(caught.value)
    assert named in message and "\n" not in message


@pytest.mark.faults
@pytest.mark.parametrize("override", ["train.epochz=3", "train.batch_size=many"])
def test_train_job_rejects_bad_keys_with_exit_2(override):
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", override], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and override.split("=")[0] in lines[0], done.stderr
