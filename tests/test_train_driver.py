"""What the driver checks and prints before and around training, without starting Ray."""

from __future__ import annotations

import pytest
import torch

import mvit
from pipeline.config import load_config, typed
from pipeline.errors import ConfigError
from pipeline.training.driver import announce_pretrained, run_training
from pipeline.training.progress import EpochProgress


def test_num_classes_below_the_label_map_stops_on_the_driver_in_one_line(tmp_path, demo, run_overrides):
    overrides = run_overrides(tmp_path, demo.train_manifest, demo.val_manifest, "model.num_classes=3")
    with pytest.raises(ConfigError, match=r"model.num_classes=3 but the label map .*labels.txt has 8 names"):
        run_training(load_config(overrides=overrides))


def test_an_epoch_line_says_where_training_is_and_how_long_is_left():
    progress = EpochProgress(epochs=4, first_epoch=0, device=torch.device("cpu"))
    progress.run_start -= 30.0  # two epochs took 30 s
    train = {"loss": 1.23456, "clips_per_sec": 12.34, "data_wait_frac": 0.081}
    progress.epoch_line(1, 8, train, {"val/top1": 0.5, "val/top5": 1.0})
    line = progress.epoch_line(2, 16, train, {"val/top1": 0.625, "val/top5": 1.0})
    assert line == (
        "epoch 2/4  step 16  train loss 1.235  val top-1 0.625 top-5 1.000  12.3 clips/s  data wait 8%  "
        "elapsed 30s  ETA 30s"
    )


def test_fine_tuning_a_head_of_another_size_is_said_once_on_the_driver(tmp_path, capsys):
    torch.save(mvit.create_model("mvit_tiny", num_classes=5).state_dict(), tmp_path / "pretrained.pt")
    settings = typed(load_config(overrides=[f"model.pretrained={tmp_path / 'pretrained.pt'}"])).model
    announce_pretrained(settings, num_classes=8)
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith("its head has 5 classes, this run 8; the head starts from random weights")
    )
    announce_pretrained(settings, num_classes=5)
    assert capsys.readouterr().out == ""
