"""A process that decodes keeps freed frame memory for the next clip: the frames of a full-resolution 1080p clip are
not faulted in again for every clip (page faults counted by the kernel, in fresh processes with and without it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.data.allocator import keep_freed_memory
from tests.conftest import REPO_ROOT

FAULTS_OF_ONE_CLIP = """
import json, resource, sys
from pipeline.data import video
if sys.argv[2] == "without":
    video.keep_freed_memory = lambda: False
info = video.probe(sys.argv[1])
clip = list(range(0, 64, 4))  # 16 frames, 1080p RGB: ~100 MB
video.decode_frames(sys.argv[1], clip, info)  # the first clip takes its memory from the kernel in any case
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
video.decode_frames(sys.argv[1], clip, info)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def faults_of_second_clip(path: Path, mode: str) -> int:
    command = [sys.executable, "-c", FAULTS_OF_ONE_CLIP, str(path), mode]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_glibc_takes_the_setting():
    assert keep_freed_memory() is True


def test_a_second_1080p_clip_reuses_the_memory_of_the_first(shared_videos):
    video = shared_videos / "h264_1080p_short.mp4"
    kept, given_back = faults_of_second_clip(video, "with"), faults_of_second_clip(video, "without")
    assert given_back > 10_000  # 16 frames of 6 MB, faulted in again 4 kB at a time
    assert kept < given_back / 5, (kept, given_back)
