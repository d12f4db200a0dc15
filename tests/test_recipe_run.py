"""The recipe and the kit in the real training loop (Ray Train's local mode: the real WorkerLoop, Ray Data pipeline,
checkpoints and MLflow store in this process, so the test can look inside): fine-tuning a pretrained file with
another head on the demo, with RandAugment, random erasing, mixup/cutmix, accumulation, layer decay, the EMA as the
model to log, and validation/checkpoints every 2 epochs."""

from __future__ import annotations

from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import mvit
from pipeline import checkpoints, tracking
from pipeline.config import load_config, typed
from pipeline.tracking import TrainingLogger
from pipeline.training import step as step_module
from pipeline.training.driver import build_trainer, plan_data, resolve_paths
from pipeline.training.worker import train_loop_per_worker


def distance(state: dict, other: dict) -> float:
    return sum(float((state[key] - other[key]).norm()) for key in state if not key.startswith("head."))


def test_fine_tuning_with_the_recipe_and_the_kit(ray_session, demo, tmp_path, run_overrides, monkeypatch):
    torch.manual_seed(123)  # not the worker's seed: weights that could only come from the file
    pretrained = mvit.create_model("mvit_tiny", num_classes=5).state_dict()
    torch.save(pretrained, tmp_path / "other_labels.pt")
    overrides = run_overrides(
        tmp_path,
        demo.train_manifest,
        demo.val_manifest,
        f"model.pretrained={tmp_path / 'other_labels.pt'}",
        "train.epochs=2",
        "train.eval_every_epochs=2",
        "train.checkpoint_every_epochs=2",
        "train.accumulate_steps=2",
        "train.layer_decay=0.75",
        "train.ema_decay=0.5",
        "train.model_to_log=ema",
        "train.mixup_alpha=0.8",
        "train.cutmix_alpha=1.0",
        "data.augment.rand_augment=rand-m7-n4-mstd0.5-inc1",
        "data.augment.erase_prob=0.5",
    )
    cfg = typed(resolve_paths(load_config(overrides=overrides), tmp_path))
    run_id = tracking.get_or_create_run(cfg.mlflow.tracking_uri, "mvit", "recipe", "recipe")
    built = build_trainer(cfg, plan_data(cfg), run_id)
    targets, logged = [], {}
    loss = step_module.soft_target_cross_entropy

    def spy_loss(logits, soft):
        targets.append(soft.detach().clone())
        return loss(logits, soft)

    saved = []
    save_state = checkpoints.save_state
    monkeypatch.setattr(
        checkpoints, "save_state", lambda folder, state, *rest: saved.append(state) or save_state(folder, state, *rest)
    )
    monkeypatch.setattr(step_module, "soft_target_cross_entropy", spy_loss)
    monkeypatch.setattr(
        TrainingLogger, "log_models", lambda self, model, best, job: logged.update(model=model, best=best)
    )
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config=built.train_loop_config,
        datasets=built.datasets,
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name="recipe", storage_path=str(tmp_path / "runs")),
    ).fit()

    steps = built.train_loop_config.steps_per_epoch
    assert len(targets) == 2 * steps * 2  # two micro-batches a step
    for soft in targets:  # label smoothing once: an absent class gets exactly 0.1 / 8
        assert torch.allclose(soft.sum(1), torch.ones(len(soft))) and abs(float(soft.min()) - 0.1 / 8) < 1e-7
    assert any(soft.max() < 0.9 + 0.1 / 8 - 1e-6 for soft in targets)  # some batches were mixed

    client = MlflowClient(cfg.mlflow.tracking_uri)
    history = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in ("val/top1", "val_ema/top1")}
    assert history == {"val/top1": [2 * steps], "val_ema/top1": [2 * steps]}  # validated once, after epoch 2
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, 2 * steps + 1))
    text = Path(client.download_artifacts(run_id, "pretrained.txt", str(tmp_path))).read_text()
    assert text.count("\n") == 1 and "fine-tuning a new head" in text and "5 classes, the model 8" in text

    [state] = saved  # local mode keeps no checkpoint folders: the one saved state, after epoch 2
    assert state["loop"]["epoch"] == 2
    scales = {round(group["lr_scale"], 6) for group in state["optimizer"]["param_groups"]}
    assert max(scales) == 1.0 and round(0.75 ** (len(mvit.create_model("mvit_tiny").blocks) + 1), 6) in scales
    fresh = mvit.create_model("mvit_tiny", num_classes=8).state_dict()
    assert distance(state["model"], pretrained) < 0.1 * distance(fresh, pretrained)
    assert all(torch.equal(state["ema"][key], value) for key, value in logged["model"].state_dict().items())
    assert all(torch.equal(state["best_model"][key], value) for key, value in logged["best"].items())
    assert not all(torch.equal(state["ema"][key], state["model"][key]) for key in state["model"])
