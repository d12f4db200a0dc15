"""`python -m jobs.train model.name=mvit_v2_tiny` trains the demo: a short real run on the session's local Ray.

Two epochs of a small demo are too few for the loss to fall reliably on every run (it is noisy at ~6 steps an epoch),
so the test asserts a finished run with finite losses and a validation top-1 per epoch."""

from __future__ import annotations

import math

from mlflow.tracking import MlflowClient

from jobs import train


def test_jobs_train_trains_mvit_v2_tiny_on_the_demo(ray_session, tmp_path, demo, run_overrides, capsys) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = run_overrides(tmp_path, demo.train_manifest, demo.val_manifest)
    extra = ["model.name=mvit_v2_tiny", "run.name=v2", "mlflow.log_models=false", "train.epochs=2", "train.lr=4e-3"]
    code = train.main([*overrides, *extra])
    output = capsys.readouterr().out
    assert code == 0, output
    run_id = next(line.split()[-1] for line in output.splitlines() if line.startswith("MLflow run id: "))
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "mvit_v2_tiny"
    losses = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    top1 = [m.value for m in client.get_metric_history(run_id, "val/top1")]
    assert len(top1) == 2 and all(0.0 <= value <= 1.0 for value in top1), top1  # one validation per epoch
