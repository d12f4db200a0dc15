"""Models logged by a real short training run (the session's `tracked_run`) load back through every URI the README
shows, at any clip size, with their labels, clip settings and val metrics; the experiment and the registry present
them as a training would."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from jobs import evaluate, predict
from pipeline.data.manifest import read_label_map, read_manifest
from pipeline.tracking.evaluation import EVALUATES_TAG
from pipeline.tracking.models import CARD_KEY, load_logged_model
from tests.conftest import REGISTERED_MODEL


def _evaluate(model: str, root: Path, demo, *extra: str) -> int:
    return evaluate.main(
        [
            f"model={model}",
            f"data.test={demo.val_manifest}",
            "data.test_clips=2",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"data.index_cache={root / 'index_cache'}",
            *extra,
        ]
    )


def test_the_run_presents_a_training_experiment_with_described_models(tracked_run, demo):
    outcome, root = tracked_run
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # Artifacts beside the store, never in the working directory of whoever created the experiment.
    assert experiment.artifact_location == (root / "mlruns").resolve().as_uri()
    best_epoch = {a.path for a in client.list_artifacts(outcome.run_id, "best_epoch")}
    assert {"best_epoch/per_class_accuracy.csv", "best_epoch/confusion_matrix.png"} <= best_epoch
    version = client.get_model_version(REGISTERED_MODEL, "1")
    assert "mvit_tiny" in version.description and "val/top1" in version.description
    models = {m.name: m for m in client.search_logged_models([run.info.experiment_id])}
    top1 = {m.key: m.value for m in models["best_model"].metrics}["val/top1"]
    history = [m.value for m in client.get_metric_history(outcome.run_id, "val/top1")]
    assert top1 == max(history)
    mlflow.set_tracking_uri(outcome.tracking_uri)  # runs:/ID/NAME resolves its logged model through it
    model_dir = mlflow.artifacts.download_artifacts(f"runs:/{outcome.run_id}/best_model", dst_path=str(root / "dl"))
    card = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())["metadata"][CARD_KEY]
    assert card["labels"] == read_label_map(demo.label_map)
    assert card["clip"] == {
        "num_frames": 8,
        "sampling_rate": 4,
        "target_fps": 30.0,
        "crop_size": 64,
        "test_short_side": 64,
        "mean": [0.45, 0.45, 0.45],
        "std": [0.225, 0.225, 0.225],
    }


def test_mlflow_users_load_it_with_mlflow_pytorch(tracked_run):
    outcome, _ = tracked_run
    mlflow.set_tracking_uri(outcome.tracking_uri)
    exported = mlflow.pytorch.load_model(f"runs:/{outcome.run_id}/best_model")
    ours = load_logged_model(f"runs:/{outcome.run_id}/best_model", outcome.tracking_uri, allow_pickle=False)
    clips = torch.randn(3, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(clips), ours.module(clips), atol=1e-5, rtol=1e-5)
        # The project's loader builds the preset itself: another clip size works.
        assert ours.module(torch.randn(1, 3, 16, 96, 96)).shape == (1, 8)


@pytest.mark.parametrize("uri", ["runs:/{run}/best_model", f"models:/{REGISTERED_MODEL}/1"])
def test_evaluate_takes_a_run_and_a_registry_uri(tracked_run, demo, capsys, uri):
    outcome, root = tracked_run
    assert _evaluate(uri.format(run=outcome.run_id), root, demo) == 0
    printed = capsys.readouterr().out
    assert f"videos evaluated: {read_manifest(demo.val_manifest).num_rows}" in printed
    client = MlflowClient(outcome.tracking_uri)
    evaluation = client.get_run(printed.split("MLflow evaluation run id: ")[1].split()[0])
    assert evaluation.data.tags[EVALUATES_TAG] == outcome.run_id


def test_predict_takes_a_run_uri_at_another_clip_size(tracked_run, demo, capsys):
    outcome, _ = tracked_run
    video = read_manifest(demo.val_manifest).column("path")[0].as_py()
    arguments = [video, f"model=runs:/{outcome.run_id}/model", f"mlflow.tracking_uri={outcome.tracking_uri}"]
    assert (
        predict.main([*arguments, "data.test_clips=1", "data.crop_size=80", "data.test_short_side=80", "--json"]) == 0
    )
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert {t["label"] for t in result["top"]} <= set(read_label_map(demo.label_map))
