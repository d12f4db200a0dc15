"""Multi-view evaluation and prediction: the same answers as an independent per-video loop, the sampler's views,
and bad videos named and left out of the totals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

import mvit
from jobs import evaluate, predict
from jobs.cli import explicit_keys
from pipeline.checkpoints import save_state
from pipeline.config import load_config, typed
from pipeline.data import dataset
from pipeline.data.manifest import read_label_map, read_manifest, write_manifest
from pipeline.data.sampling import ClipSpec, uniform_clips
from pipeline.data.transforms import EvalTransform
from pipeline.data.video import decode_frames, probe
from pipeline.errors import ConfigError
from pipeline.evaluation import loading
from pipeline.evaluation.loading import ModelReference, ModelSourceError, load_model
from pipeline.evaluation.views import clip_settings
from pipeline.tracking.evaluation import EVALUATES_TAG
from tests.clips import decode_tasks, eval_transform
from tests.videos import H264_BFRAMES_LONG_GOP, index_of, sequential_frames, write_indexed_video

DATA = {
    "num_frames": 8,
    "sampling_rate": 2,
    "target_fps": 30.0,
    "crop_size": 64,
    "test_short_side": 64,
    "mean": [0.45, 0.45, 0.45],
    "std": [0.225, 0.225, 0.225],
}


def _checkpoint(folder: Path, labels: list[str], training_run_id: str | None = None) -> Path:
    """A training checkpoint of mvit_tiny with a widened head, so that videos get clearly different scores."""
    torch.manual_seed(0)
    model = mvit.create_model("mvit_tiny", num_classes=len(labels))
    with torch.no_grad():
        model.head.weight.mul_(50)
    save_state(
        folder,
        {
            "model": model.state_dict(),
            "model_name": "mvit_tiny",
            "num_classes": len(labels),
            "input_size": [8, 64, 64],
            "labels": labels,
            "mlflow_run_id": training_run_id,
            "config": {"data": DATA},
        },
    )
    return folder


def _independent_scores(model: torch.nn.Module, path: str, clips: int) -> np.ndarray:
    """Decode front to back with PyAV, cut the sampler's clips, forward each, average the softmax."""
    info = probe(path)
    spec = ClipSpec(DATA["num_frames"], DATA["sampling_rate"], DATA["target_fps"])
    positions = uniform_clips(info.num_frames, info.fps, spec, clips)
    frames = sequential_frames(Path(path))
    transform = EvalTransform(DATA["test_short_side"], DATA["crop_size"], 1)
    views = [view for clip in positions for view in transform(np.stack([frames[i] for i in clip.indices]))]
    x = torch.from_numpy(np.stack(views)).permute(0, 4, 1, 2, 3).float().div(255)
    x = (x - 0.45) / 0.225
    with torch.no_grad():
        return torch.softmax(model(x), dim=-1).mean(0).numpy()


def _evaluation_run(tracking_db: Path) -> tuple[MlflowClient, object]:
    client = MlflowClient(f"sqlite:///{tracking_db}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("mvit").experiment_id], filter_string="tags.`mvit.kind` = 'evaluation'"
    )
    return client, run


def test_evaluate_matches_an_independent_per_video_loop(ray_session, tmp_path, demo, capsys):
    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    training = client.create_run(client.create_experiment("mvit")).info.run_id
    labels = read_label_map(demo.label_map)
    checkpoint = _checkpoint(tmp_path / "checkpoint", labels, training)
    assert (
        evaluate.main(
            [
                f"model={checkpoint}",
                f"data.test={demo.val_manifest}",
                "data.test_clips=3",
                f"mlflow.tracking_uri=sqlite:///{db}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out

    model = mvit.create_model("mvit_tiny", num_classes=8)
    model.load_state_dict(torch.load(checkpoint / "state.pt", weights_only=True)["model"])
    model.eval()
    manifest = read_manifest(demo.val_manifest)
    expected = {path: _independent_scores(model, path, 3) for path in manifest.column("path").to_pylist()}
    truth = dict(zip(manifest.column("path").to_pylist(), manifest.column("label").to_pylist()))
    top1 = np.mean([expected[p].argmax() == truth[p] for p in expected])

    client, run = _evaluation_run(db)
    assert run.data.tags[EVALUATES_TAG] == training
    assert run.data.metrics["test/top1"] == pytest.approx(top1) and run.data.metrics["test/videos"] == len(expected)
    assert f"top1: {top1:.4f}" in printed
    with_scores = pq.read_table(client.download_artifacts(run.info.run_id, "predictions.parquet", str(tmp_path)))
    assert with_scores.num_rows == len(expected)
    for row in with_scores.to_pylist():
        np.testing.assert_allclose(row["scores"], expected[row["path"]], atol=1e-5)
        assert row["prediction"] == expected[row["path"]].argmax()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions.parquet", "confusion_matrix.png", "per_class_accuracy.csv"} <= artifacts


@pytest.mark.parametrize("clips, crops", [(5, 1), (10, 3)])
def test_views_are_the_samplers_clips_and_crops(ray_session, tmp_path, clips, crops):
    path = write_indexed_video(tmp_path / "indexed.mp4", H264_BFRAMES_LONG_GOP)
    index = index_of([path])
    spec = ClipSpec(8, 4, 30.0)
    tasks = decode_tasks(videos_per_task=4)
    rows = dataset.test_dataset(
        index, spec=spec, transform=eval_transform(num_crops=crops), num_clips=clips, tasks=tasks
    )
    rows = rows.take_all()
    assert sorted(row["view"] for row in rows) == list(range(clips * crops))
    info = probe(path)
    positions = uniform_clips(info.num_frames, info.fps, spec, clips)
    starts = [clip.indices[0] for clip in positions]
    assert starts == sorted(starts) and len(set(starts)) == clips  # spread over the video, in order
    for row in rows:
        clip, crop = divmod(row["view"], crops)
        expected = eval_transform(num_crops=crops)(decode_frames(path, positions[clip].indices))[crop]
        np.testing.assert_array_equal(row["clip"], expected)


def test_a_corrupt_and_a_missing_video_are_named_and_left_out(ray_session, tmp_path, demo, capsys):
    manifest = read_manifest(demo.val_manifest)
    corrupt = tmp_path / "corrupt.mp4"
    good = Path(manifest.column("path")[0].as_py()).read_bytes()
    corrupt.write_bytes(good[: len(good) // 3])
    rows = [*manifest.to_pylist(), {"path": str(corrupt), "label": 0}, {"path": str(tmp_path / "gone.mp4"), "label": 1}]
    write_manifest(pa.Table.from_pylist(rows).select(["path", "label"]), tmp_path / "test.csv")
    checkpoint = _checkpoint(tmp_path / "checkpoint", read_label_map(demo.label_map))
    db = tmp_path / "mlflow.db"
    assert (
        evaluate.main(
            [
                f"model={checkpoint}",
                f"data.test={tmp_path / 'test.csv'}",
                "data.test_clips=1",
                "data.allow_outside_root=true",
                f"mlflow.tracking_uri=sqlite:///{db}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"videos evaluated: {manifest.num_rows}" in printed
    assert "corrupt.mp4" in printed and "gone.mp4" in printed
    client, run = _evaluation_run(db)
    assert run.data.metrics["test/videos"] == manifest.num_rows and run.data.metrics["test/excluded"] == 2
    unusable = Path(client.download_artifacts(run.info.run_id, "unusable_videos.tsv", str(tmp_path))).read_text()
    assert "corrupt.mp4" in unusable and "gone.mp4" in unusable


def test_predict_prints_five_labels_for_each_shared_video(tmp_path, shared_videos, capsys):
    labels = read_label_map(shared_videos.parent / "kinetics400_labels.txt")
    checkpoint = _checkpoint(tmp_path / "checkpoint", labels)
    videos = sorted(str(p) for p in shared_videos.iterdir() if p.is_file())
    assert predict.main([*videos, f"model={checkpoint}", "data.test_clips=2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["video"] for r in results] == videos
    for result in results:
        assert len(result["top"]) == 5 and {t["label"] for t in result["top"]} <= set(labels)
        probabilities = [t["probability"] for t in result["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6

    missing = str(tmp_path / "missing.mp4")
    assert predict.main([videos[0], missing, f"model={checkpoint}", "data.test_clips=1", "top_k=3"]) == 3
    table = capsys.readouterr().out
    assert missing in table and "error:" in table and table.count("  1. ") == 1 and "  3. " in table


def test_predict_names_a_missing_model_in_one_line(tmp_path, demo, capsys):
    video = read_manifest(demo.val_manifest).column("path")[0].as_py()
    assert predict.main([video, f"model={tmp_path / 'nowhere.pt'}"]) == 4
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "nowhere.pt" in error


def test_a_bare_state_dict_keeps_its_own_head_and_a_different_label_map_is_refused(tmp_path):
    """No label map: the classes are the checkpoint's, not a guessed 400 whose head would be silently random."""
    torch.manual_seed(0)
    model = mvit.create_model("mvit_tiny", num_classes=8)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    loaded = load_model(ModelReference(str(tmp_path / "bare.pt"), model_name="mvit_tiny"))
    assert loaded.labels == [str(i) for i in range(8)]
    torch.testing.assert_close(loaded.module.head.weight, model.head.weight)
    with pytest.raises(ModelSourceError, match="its head has 8 classes but the label map has 5 names"):
        load_model(ModelReference(str(tmp_path / "bare.pt"), model_name="mvit_tiny", labels=list("abcde")))


def test_clip_settings_from_a_config_file_win_over_the_checkpoints(tmp_path):
    (tmp_path / "eval.yaml").write_text("data:\n  crop_size: 96\n  test_short_side: 112\n")
    explicit = explicit_keys(["--config", str(tmp_path / "eval.yaml"), "data.test_clips=2"])
    assert {"data.crop_size", "data.test_short_side", "data.test_clips"} <= explicit
    cfg = typed(load_config(tmp_path / "eval.yaml", ["data.test_clips=2"], evaluation=True))
    loaded = load_model(ModelReference(str(_checkpoint(tmp_path / "checkpoint", list("abcdefgh")))))
    settings = clip_settings(cfg, loaded, explicit)
    assert settings.crop_size == 96 and settings.num_frames == DATA["num_frames"]
    with pytest.raises(ConfigError, match="data.crop_size=96 is above data.test_short_side=64"):
        clip_settings(cfg, loaded, explicit - {"data.test_short_side"})  # a crop the model's short side can't give


def test_a_loading_error_without_a_message_is_named_by_its_type():
    """The reason after "model NAME: " is one line even for an error with no message (an `EOFError()`, which a
    stream cut off mid-unpickling raises): its type, not an IndexError from an empty first line."""
    assert loading._why(EOFError()) == "EOFError"
    assert loading._why(ValueError("the first line\nand more")) == "the first line"


def test_a_checkpoint_path_that_does_not_exist_lists_those_that_do(tmp_path):
    run = tmp_path / "runs" / "mvit-demo"
    _checkpoint(run / "checkpoint_2026-12-01_10-00-00.000001", list("ab"))
    with pytest.raises(ModelSourceError, match="checkpoints in .*mvit-demo: checkpoint_2026-12-01_10-00-00.000001"):
        load_model(ModelReference(str(run / "checkpoint_000015")))
    assert load_model(ModelReference(str(run))).labels == ["a", "b"]  # a run folder: its newest checkpoint


class _RunsACommand(torch.nn.Module):
    """A model whose pickle runs a shell command when it is loaded: what anyone with write access could register."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_registry_model_is_refused_before_it_runs_anything(tmp_path, demo, capsys, monkeypatch):
    marker = tmp_path / "code_ran"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        mlflow.pytorch.log_model(
            _RunsACommand(str(marker)),
            name="model",
            serialization_format="pickle",
            pip_requirements=[],
            registered_model_name="planted",
        )
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # MLflow's own guard off: ours must hold
    video = read_manifest(demo.val_manifest).column("path")[0].as_py()
    assert predict.main([video, "model=models:/planted/1", f"mlflow.tracking_uri={uri}"]) == 4
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (MLflow's own log lines of the setup come first)
    assert error.startswith("jobs.predict: error: MLflow model models:/planted/1: stored as a pickle")
    assert "allow_pickle=true" in error and not marker.exists()
    # The planted model does run its command once the user opts in: the refusal above is what stopped it.
    assert predict.main([video, "model=models:/planted/1", f"mlflow.tracking_uri={uri}", "allow_pickle=true"]) == 4
    assert marker.exists()
