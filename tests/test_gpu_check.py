"""`python -m jobs.benchmark gpu-check --tiny`: the GPU check on the CPU at tiny sizes, through every part but the
fp16 Ray Train run (a Ray Train run costs about a minute here; the fp16 GradScaler path is the fault suite's
numerics test, in the real WorkerLoop)."""

from __future__ import annotations

import argparse
import json

from jobs.benchmark import gpu_check


def test_the_gpu_check_runs_every_part_on_the_cpu(ray_session, demo, tmp_path):
    parser = argparse.ArgumentParser()
    gpu_check.add_arguments(parser)
    parts = [name for name in gpu_check.gpu_parts.PART_NAMES if name != "ray_train.fp16"]
    args = parser.parse_args(["--tiny", "--out", str(tmp_path), "--demo", str(demo.root), "--parts", *parts])
    code = gpu_check.run(args)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    expected = {name: ("skipped" if name.endswith("_compiled") else "ok", None) for name in parts}
    parts = report["parts"]
    assert {name: (part["status"], part.get("error")) for name, part in parts.items()} == expected
    assert code == 0
    assert parts["parity"]["bf16_vs_fp32_rel_error"] < 0.05 and "torchvision" in parts["parity"]
    for name in ("model.train", "model.infer"):
        assert parts[name]["clips_per_s"] > 0 and parts[name]["mfu_pct"] > 0 and parts[name]["peak_mib"] > 0
    assert parts["model.largest_batch"]["largest_batch"] == 2 == parts["model.largest_batch"]["capped_at"]
    assert parts["model.host_syncs"]["syncs_in_steps"] == 0 and parts["model.host_syncs"]["syncs_at_flush"] == 1
    assert parts["sdpa"]["blocks"]
    for name in ("ray_train.bf16_compile", "ray_train.evaluate"):
        assert parts[name]["mlflow_status"] == "FINISHED", name
    data = parts["data"]
    assert data["cores_needed"]["recipe_augment"] > 0 and data["erase_ms_per_batch_on_device"] > 0
    assert "| ray_train.evaluate | ok |" in gpu_check.table(report)
