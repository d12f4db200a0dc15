"""`python -m jobs.benchmark pipeline` and `scale` run end to end on a tiny video and report their figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.videos import H264_BFRAMES_LONG_GOP, write_indexed_video

SMALL_CLIPS = [
    "--set",
    "data.num_frames=4",
    "data.sampling_rate=2",
    "data.crop_size=32",
    "data.augment.crop=short_side_jitter",
    "data.augment.min_short_side=32",
    "data.augment.max_short_side=40",
    "train.batch_size=2",
]


def _benchmark(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "jobs.benchmark", *arguments]
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return finished


@pytest.mark.ray
def test_pipeline_benchmark_reports_ray_and_loop_cpu_per_clip_for_each_setting(tmp_path):
    video = write_indexed_video(tmp_path / "video.mp4", H264_BFRAMES_LONG_GOP)
    out = tmp_path / "figures.json"
    _benchmark("pipeline", str(video), "--repeat", "4", "--rounds", "1", "--json", str(out), *SMALL_CLIPS)
    results = json.loads(out.read_text())["results"]
    assert [(r["num_clips"], r["clips"]["ray"], r["clips"]["loop"]) for r in results] == [(1, 4, 4), (2, 8, 8)]
    assert all(ms > 0 for r in results for ms in r["cpu_ms_per_clip"].values())


@pytest.mark.ray
def test_scale_benchmark_reports_the_epoch_the_index_and_the_actor(tmp_path):
    video = write_indexed_video(tmp_path / "video.mp4", H264_BFRAMES_LONG_GOP)
    out = tmp_path / "figures.json"
    arguments = ["--rows", "50", "200", "--clips", "8", "--actor-seconds", "0.5", "--actor-callers", "2"]
    _benchmark("scale", str(video), *arguments, "--json", str(out), *SMALL_CLIPS)
    figures = json.loads(out.read_text())
    assert [epoch["rows"] for epoch in figures["epochs"]] == [50, 200]
    assert all(epoch["clips"] >= 8 and epoch["first_batch_s"] > 0 for epoch in figures["epochs"])
    sizes = figures["index_bytes_per_video"]
    assert sizes["1h_cfr_arrow"] < sizes["1h_vfr_arrow"] / 10 and sizes["1h_ms_arrow"] < sizes["1h_vfr_arrow"] / 10
    assert [result["pattern"] for result in figures["actor"]] == ["per task", "per video"]
    assert all(result["actor_cpu_ms_per_call"] >= 0 for result in figures["actor"])  # read from its own process
