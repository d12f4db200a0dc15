"""Speed features of the model: bf16 attention without fp32 scores, activation checkpointing, the pooling layout,
and the per-block SDPA backend report. Each must leave the model's result unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mvit


class AtenLog(TorchDispatchMode):
    """Records every aten op that runs, with the dtypes of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def tiny(**overrides: object) -> mvit.MViT:
    torch.manual_seed(0)
    return mvit.create_model("mvit_tiny", num_classes=5, drop_path_rate=0.0, head_dropout=0.0, **overrides)


def test_bf16_autocast_attention_runs_fused_on_bf16_inputs_without_a_softmax() -> None:
    """Under bf16 autocast every attention call gets bf16 q, k, v and runs a fused kernel, forward and backward: no
    op materialises the scores and no softmax runs (in fp32 or at all), as it would with matmul + softmax.
    (The loss is a plain square, so that a cross-entropy's log-softmax does not show up in the log.)"""
    model = tiny().train()
    clip = torch.randn(1, 3, 8, 64, 64)
    with AtenLog() as log:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(clip).float().square().mean()
        loss.backward()
    attention = [(name, dtypes) for name, dtypes in log.calls if "scaled_dot_product" in name]
    forward = [dtypes for name, dtypes in attention if "backward" not in name]
    assert len(forward) == len(model.blocks)
    assert all(dtypes[:3] == [torch.bfloat16] * 3 for dtypes in forward), forward
    assert sum("backward" in name for name, _ in attention) == len(model.blocks)
    assert not [name for name, _ in log.calls if "softmax" in name or "_math" in name]


def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients() -> None:
    plain, checkpointed = tiny(), tiny(activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    clip, labels = torch.randn(2, 3, 8, 64, 64), torch.tensor([0, 4])
    gradients, block_calls = [], []
    for model in (plain, checkpointed):
        calls = []
        model.blocks[1].register_forward_pre_hook(lambda module, inputs, calls=calls: calls.append(1))
        F.cross_entropy(model.train()(clip), labels).backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
        block_calls.append(len(calls))
    assert block_calls == [1, 2]  # the checkpointed block ran again in the backward pass
    for name, expected in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], expected, msg=name)
    with torch.no_grad():  # no recomputation outside training
        checkpointed.eval()(clip)
    assert block_calls[-1] == 2


def test_channels_last_pooling_feeds_ndhwc_volumes_and_gives_the_same_logits() -> None:
    contiguous, channels_last = tiny(), tiny(pool_memory_format="channels_last_3d")
    channels_last.load_state_dict(contiguous.state_dict())
    layouts = []
    for model in (contiguous, channels_last):
        conv = model.blocks[1].attn.pool_q.pool
        conv.register_forward_pre_hook(
            lambda module, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last_3d))
        )
    clip = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        expected, actual = contiguous.eval()(clip), channels_last.eval()(clip)
    assert layouts == [False, True]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_pool_memory_format_is_validated() -> None:
    with pytest.raises(ValueError, match=r"^pool_memory_format must be one of .*'channels_last'"):
        mvit.create_model("mvit_tiny", pool_memory_format="channels_last")


def test_sdpa_backends_reports_every_block_of_mvit_tiny_on_cpu() -> None:
    report = mvit.sdpa_backends(tiny(), (2, 3, 8, 64, 64), torch.bfloat16, "cpu", backward=True)
    # tokens (class token included): 4×16² → q pooled to 4×8² and 4×4²; keys and values stay at 4×4²
    assert [(b.shape.q_length, b.shape.kv_length) for b in report] == [(1025, 65), (257, 257), (257, 65), (65, 257)]
    assert [(b.shape.heads, b.shape.head_dim) for b in report] == [(1, 32), (2, 32), (2, 32), (4, 32)]
    for block in report:
        assert block.chosen == "FLASH_ATTENTION"
        assert block.usable == {
            "FLASH_ATTENTION": True,
            "EFFICIENT_ATTENTION": False,
            "CUDNN_ATTENTION": False,
            "MATH": True,
        }
        assert block.reasons["EFFICIENT_ATTENTION"] == "no cpu kernel"
