"""The training kit on the CPU, without Ray: gradient accumulation (against the large batch, one all-reduce per
optimizer step under DDP), a step without host syncs, the bad-step streak read once per window, layer-wise lr decay,
weight decay of positional embeddings, the EMA, and the lr scaling of PySlowFast's recipe."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mvit
from conf import CONF_DIR
from pipeline.config import load_config, typed
from pipeline.data.augment import RandomErasing
from pipeline.data.transforms import Normalise
from pipeline.training.ema import WeightEma
from pipeline.training.mixup import MixupCutmix
from pipeline.training.optim import ensure_fused, layer_of, parameter_groups, set_lr
from pipeline.training.step import TrainStep, lr_schedule
from pipeline.training.window import NonFiniteLossError, StepWindow

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


def train_config(*overrides: str):
    return typed(load_config(overrides=["train.grad_clip=1e9", *overrides])).train


def tiny_model(num_classes: int = 4) -> mvit.MViT:
    torch.manual_seed(0)
    return mvit.create_model(
        "mvit_tiny", num_classes=num_classes, input_size=(4, 32, 32), drop_path_rate=0.0, head_dropout=0.0
    )


def batches(count: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "clip": torch.from_numpy(rng.integers(0, 256, (size, 4, 32, 32, 3), dtype=np.uint8)),
            "label": torch.from_numpy(rng.integers(0, 4, size)),
        }
        for _ in range(count)
    ]


def make_step(model: nn.Module, bare: nn.Module, train, precision: str = "fp32", erasing=None) -> TrainStep:
    normalise = Normalise([0.45] * 3, [0.225] * 3)
    mixup = MixupCutmix.from_config(train, 4, seed=0)
    return TrainStep.build(model, bare, train, 1, (normalise, erasing, mixup), precision)


@pytest.fixture()
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def counted_ddp(model: nn.Module) -> tuple[DistributedDataParallel, list[int]]:
    """DDP whose every gradient all-reduce (one per bucket) is counted by a communication hook."""
    calls = [0]

    def hook(state, bucket):
        calls[0] += 1
        tensor = bucket.buffer()
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, hook)
    return ddp, calls


def test_accumulated_gradient_equals_the_large_batch_gradient_with_one_all_reduce(process_group):
    train = train_config("train.accumulate_steps=4")
    large, small = tiny_model(), tiny_model()
    large_ddp, large_calls = counted_ddp(large)
    small_ddp, small_calls = counted_ddp(small)
    whole = batches(1, 8)[0]
    parts = [{key: value[i : i + 2] for key, value in whole.items()} for i in range(0, 8, 2)]
    loss_large, _ = make_step(large_ddp, large, train_config())(whole, 0.0)
    loss_small, applied = make_step(small_ddp, small, train)(parts, 0.0)
    assert bool(applied) and float(loss_small) == pytest.approx(float(loss_large), rel=1e-5)
    for (name, a), b in zip(large.named_parameters(), small.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name
    assert small_calls[0] == large_calls[0] > 0  # the 3 inner micro-batches ran under no_sync


def test_a_non_finite_accumulated_step_changes_nothing():
    model = tiny_model()
    step = make_step(model, model, train_config("train.accumulate_steps=2"))
    step(batches(2, 2), 0.0)
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [v.clone() for s in step.optimizer.state.values() for v in s.values()]
    step.normalise.std.zero_()
    loss, applied = step(batches(2, 2, seed=1), 0.0)
    assert not bool(applied) and not torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(
        torch.equal(a, b) for a, b in zip(moments, [v for s in step.optimizer.state.values() for v in s.values()])
    )


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_steps_read_nothing_on_the_host_until_the_window_flushes(monkeypatch, precision):
    """Every call that copies a tensor's value to the host (on CUDA, a sync) is counted during the steps."""
    model = tiny_model()
    train = train_config("train.mixup_alpha=0.8", "train.cutmix_alpha=1.0", "train.ema_decay=0.99")
    step = make_step(model, model, train, precision, RandomErasing(0.5, "pixel", 1, np.random.default_rng(0)))
    window = StepWindow(torch.device("cpu"), max_bad_steps=2)
    data = batches(3, 2)
    reads: list[str] = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for number, batch in enumerate(data, start=1):
        loss, applied = step(batch, 0.0)
        window.add(loss, applied, number, 2)
    assert reads == []
    figures, in_streak = window.flush(step.lr)
    assert reads == ["tolist"] and not in_streak and set(figures) >= {"train/loss", "train/clips_per_sec"}


def test_an_optimizer_restored_from_a_non_fused_checkpoint_still_skips_on_the_device():
    model = tiny_model()
    groups = [{key: value for key, value in g.items() if key != "lr_scale"} for g in parameter_groups(model, 0.05)]
    old = torch.optim.AdamW(groups, lr=1e-3)  # as checkpoints saved it before the step was fused
    step = make_step(model, model, train_config())
    step.optimizer.load_state_dict(old.state_dict())
    ensure_fused(step.optimizer)
    step.normalise.std.zero_()
    weights = [p.detach().clone() for p in model.parameters()]
    assert not bool(step(batches(1, 2)[0], 0.0)[1])
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_the_bad_step_streak_stops_at_the_step_that_passes_the_limit():
    window = StepWindow(torch.device("cpu"), max_bad_steps=2)
    loss = torch.tensor(1.0)
    for number, good in enumerate([True, False, False], start=1):
        window.add(loss if good else torch.tensor(float("nan")), torch.tensor(good), number, 4)
    figures, in_streak = window.flush(1e-3)
    assert in_streak and figures["train/loss"] == 1.0  # only the applied step's loss
    for number, good in enumerate([True, False, False, False, True], start=4):
        window.add(loss if good else torch.tensor(float("nan")), torch.tensor(good), number, 4)
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 7: steps 5-7 all had a non-finite loss"):
        window.flush(1e-3)


def test_layer_decay_puts_every_parameter_in_one_group_in_depth_order():
    model = tiny_model()
    groups = parameter_groups(model, 0.05, zero_decay_pos_cls=False, layer_decay=0.75)
    ids = [id(p) for group in groups for p in group["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    depth = len(model.blocks) + 1
    scale_of = {id(p): group["lr_scale"] for group in groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert scale_of[id(parameter)] == pytest.approx(0.75 ** (depth - layer_of(name, len(model.blocks))))
    named = dict(model.named_parameters())
    assert scale_of[id(named["head.weight"])] == 1.0
    assert scale_of[id(named["patch_embed.weight"])] == pytest.approx(0.75**depth)
    assert scale_of[id(named["blocks.0.attn.qkv.weight"])] < scale_of[id(named["blocks.1.attn.qkv.weight"])]
    assert decay_of[id(named["pos_embed.class_token"])] == 0.05  # ZERO_DECAY_POS_CLS: False decays them
    assert decay_of[id(named["blocks.0.norm1.weight"])] == 0.0 and decay_of[id(named["head.bias"])] == 0.0
    exempt = parameter_groups(model, 0.05, zero_decay_pos_cls=True)
    assert {id(p) for p in exempt[1]["params"]} >= {id(p) for n, p in named.items() if n.startswith("pos_embed.")}
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr(optimizer, 2e-4)
    assert {round(g["lr"] / 2e-4, 6) for g in optimizer.param_groups} == {round(g["lr_scale"], 6) for g in groups}
    stray = nn.Module()
    stray.blocks, stray.extra = nn.ModuleList(), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'extra.weight'"):
        parameter_groups(stray, 0.05, layer_decay=0.75)


def test_the_ema_follows_applied_steps_only():
    model = nn.Linear(3, 2)
    ema = WeightEma(model, decay=0.9)
    start = copy.deepcopy(ema.module.weight.detach())
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, torch.tensor(False))
    assert torch.equal(ema.module.weight, start)
    ema.update(model, torch.tensor(True))
    assert torch.allclose(ema.module.weight, 0.9 * start + 0.1 * model.weight)
    assert not ema.module.weight.requires_grad


def test_every_lr_of_the_recipe_scales_as_pyslowfast_scales_base_lr_by_shards():
    """MVIT_B_16x4_CONV: BASE_LR 1e-4, WARMUP_START_LR and COSINE_END_LR 1e-6, per shard of 8 GPUs × 2 videos × 2
    clips (NUM_SAMPLE) = 32 clips, all three multiplied by NUM_SHARDS (BASE_LR_SCALE_NUM_SHARDS)."""
    recipe = typed(load_config(CONF_DIR / "kinetics400_mvit_b_16x4.yaml")).train
    for shards in (1, 4, 16):
        schedule = lr_schedule(recipe, global_batch=32 * shards)
        assert schedule.peak_lr == pytest.approx(1e-4 * shards)
        assert schedule.warmup_start_lr == pytest.approx(1e-6 * shards)
        assert schedule.min_lr == pytest.approx(1e-6 * shards)
    assert lr_schedule(recipe, 8 * 64).peak_lr == pytest.approx(1.6e-3)  # the paper's 1.6e-3 at 512
    assert recipe.batch_size * 8 * recipe.accumulate_steps == 512  # the recipe's 8 workers reach it
    finetune = load_config(CONF_DIR / "finetune_mvit_b_16x4.yaml", ["model.pretrained=k400.pt"])
    assert finetune.train.layer_decay < 1 and finetune.train.lr < recipe.lr and finetune.model.num_classes == 0
