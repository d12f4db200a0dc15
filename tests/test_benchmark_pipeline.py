"""`python -m jobs.benchmark pipeline` runs end to end and reports both repeated-augmentation settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.videos import H264_BFRAMES_LONG_GOP, write_indexed_video


@pytest.mark.ray
def test_pipeline_benchmark_reports_clips_per_core_for_each_setting(tmp_path):
    video = write_indexed_video(tmp_path / "video.mp4", H264_BFRAMES_LONG_GOP)
    out = tmp_path / "figures.json"
    command = [
        sys.executable,
        "-m",
        "jobs.benchmark",
        "pipeline",
        str(video),
        "--repeat",
        "4",
        "--num-frames",
        "4",
        "--sampling-rate",
        "2",
        "--crop-size",
        "32",
        "--short-side",
        "32",
        "40",
        "--json",
        str(out),
    ]
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["num_clips"], r["clips"]) for r in results] == [(1, 4), (2, 8)]
    assert all(r["clips_per_sec_per_core"] > 0 for r in results)
    assert "per core" in finished.stdout
