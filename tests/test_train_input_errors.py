"""`python -m jobs.train` meets bad data and settings with one line that names the thing, and its kind's exit code
(3 for data, 4 for a model file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import train
from tests.videos import VideoSpec, write_indexed_video

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    write_indexed_video(root / "v.mp4", VideoSpec(num_frames=20))
    (root / "labels.txt").write_text("cat\ndog\n")
    manifests = {
        "good.csv": "path,label\nv.mp4,cat\n",
        "empty.csv": "path,label\n",
        "columns.csv": "file,class\nv.mp4,cat\n",
        "unknown_label.csv": "path,label\nv.mp4,cow\n",
        "outside.csv": "path,label\nv.mp4,cat\n../../etc/hosts,dog\n",
    }
    for name, text in manifests.items():
        (root / name).write_text(text)
    (root / "not_weights.pt").write_text("not a weights file\n")
    return root


@pytest.mark.parametrize(
    ("override", "named", "exit_code"),
    [
        ("data.train={root}/empty.csv", "empty.csv: the manifest is empty", 3),
        ("data.train={root}/columns.csv", "columns.csv: wrong columns ['file', 'class']", 3),
        ("data.train={root}/unknown_label.csv", "unknown_label.csv: row 1 has unknown label 'cow'", 3),
        ("data.train={root}/outside.csv", "outside.csv: row 2 path '../../etc/hosts' is outside the root", 3),
        ("data.train={root}/missing.csv", "data.train {root}/missing.csv: no such file", 3),
        ("model.pretrained={root}/missing.pt", "model.pretrained {root}/missing.pt: no such file", 4),
        ("model.pretrained={root}/not_weights.pt", "model.pretrained {root}/not_weights.pt (native): ", 4),
    ],
)
def test_bad_data_or_settings_stop_training_in_one_line(
    ray_session, folder: Path, capsys, override: str, named: str, exit_code: int
) -> None:
    code = train.main(
        [
            f"data.train={folder}/good.csv",
            f"data.val={folder}/good.csv",
            f"data.labels={folder}/labels.txt",
            f"run.storage_path={folder}/runs",
            f"mlflow.tracking_uri=sqlite:///{folder}/mlflow.db",
            override.format(root=folder),
        ]
    )
    error = capsys.readouterr().err.strip()
    assert code == exit_code
    assert error.startswith("jobs.train: error: ") and "\n" not in error, error
    assert named.format(root=folder) in error
