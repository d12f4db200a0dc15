"""`python -m jobs.benchmark model` end to end on the CPU: every figure of the speed report is there and sane."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mvit
from jobs.benchmark import model as benchmark
from jobs.benchmark.torchvision_reference import load_torchvision_mvit_v1_b

FIGURES = ("median ms", "clips/s", "peak MiB", "GFLOP/step", "TFLOP/s", "MFU %")


def run_benchmark(tmp_path: Path, *arguments: str) -> dict:
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    output = tmp_path / "report.json"
    args = parser.parse_args([*arguments, "--device", "cpu", "--ceiling-size", "256", "--json", str(output)])
    assert benchmark.run(args) == 0
    return json.loads(output.read_text())


def assert_positive_finite(row: dict) -> None:
    for figure in FIGURES:
        assert isinstance(row[figure], float) and math.isfinite(row[figure]) and row[figure] > 0, (figure, row)


@pytest.mark.parametrize(("mode", "forwards"), [("train", 3), ("infer", 1)])
def test_speed_report_of_mvit_tiny(tmp_path: Path, mode: str, forwards: int) -> None:
    report = run_benchmark(
        tmp_path, "--preset", "mvit_tiny", "--mode", mode, "--batch-size", "2", "--warmup", "1", "--repeats", "2"
    )
    assert report["benchmark"] == f"model speed {mode}"
    [row] = report["rows"]  # torchvision's mvit_v1_b cannot take mvit_tiny's clips: skipped with a note
    assert (row["model"], row["mode"], row["batch"]) == ("mvit", mode, 2)
    assert_positive_finite(row)
    ceiling = report["ceiling"]["TFLOP/s"]
    assert math.isfinite(ceiling) and ceiling > 0
    assert row["MFU %"] == pytest.approx(100 * row["TFLOP/s"] / ceiling)
    assert row["clips/s"] == pytest.approx(2000 / row["median ms"])
    gmacs = mvit.count_gmacs(mvit.create_model("mvit_tiny"), (2, 3, 8, 64, 64))
    assert row["GFLOP/step"] == pytest.approx(forwards * 2 * gmacs)  # a training step counts 3 forwards
    assert len(report["seconds"]["mvit"]) == 2
    assert any(note.startswith("torchvision: skipped") for note in report["notes"])
    assert report["ratio_vs_torchvision"] is None


def torchvision_like(preset: str) -> Callable[[], torch.nn.Module]:
    """torchvision's MViT class (the code of mvit_v1_b) with ``preset``'s blocks and clip size.

    mvit_v1_b itself only takes 16×224² clips, and comparing at that size takes about 40 s on this project's CPU,
    too long for the suite; the comparison path of the benchmark is the same at any size.
    """
    from torchvision.models.video.mvit import MSBlockConfig, _mvit

    config = mvit.preset_config(preset)

    def pooling(pool: mvit.PoolConfig) -> tuple[list[int], list[int]]:
        return ([], []) if pool.is_identity else (list(pool.kernel), list(pool.stride))

    blocks = [
        MSBlockConfig(
            b.num_heads,
            b.dim_in,
            b.dim_out,
            pooling(b.pool_q)[0],
            pooling(b.pool_k)[0],
            pooling(b.pool_q)[1],
            pooling(b.pool_k)[1],
        )
        for b in config.blocks
    ]
    return lambda: _mvit(
        blocks,
        config.drop_path_rate,
        None,
        False,
        spatial_size=config.input_size[1:],
        temporal_size=config.input_size[0],
        residual_with_cls_embed=False,
    )


def test_speed_report_compares_with_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if load_torchvision_mvit_v1_b() is None:
        pytest.skip("torchvision is not importable")
    monkeypatch.setattr(benchmark, "_torchvision_builder", lambda args, size: (torchvision_like("mvit_tiny"), None))
    report = run_benchmark(
        tmp_path, "--preset", "mvit_tiny", "--mode", "infer", "--batch-size", "2", "--warmup", "0", "--repeats", "2"
    )
    rows = {row["model"]: row for row in report["rows"]}
    assert set(rows) == {"mvit", "torchvision"}
    for row in rows.values():
        assert_positive_finite(row)
    assert rows["mvit"]["GFLOP/step"] == pytest.approx(rows["torchvision"]["GFLOP/step"])  # the same network
    assert report["ratio_vs_torchvision"] == pytest.approx(rows["mvit"]["clips/s"] / rows["torchvision"]["clips/s"])
    assert report["logits_relative_error"] < 1e-4  # same weights, same input
    assert len(report["seconds"]["torchvision"]) == 2


def test_sdpa_report_names_each_block_and_marks_cuda_unmeasured(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "--sdpa-report", "--preset", "mvit_tiny", "--precision", "bf16")
    assert [row["block"] for row in report["rows"]] == [0, 1, 2, 3]
    assert {row["chosen"] for row in report["rows"]} == {"flash"}
    assert any("not measured" in note for note in report["notes"])
