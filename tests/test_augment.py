"""The recipe's augmentations against the implementations that define them: timm's RandAugment (its own module, run
per frame), torchvision's colour-jitter functionals, timm's/PySlowFast's random erasing draws; one draw per clip."""

from __future__ import annotations

import importlib.util
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data import augment
from pipeline.data.augment import ColorJitter, RandAugment, RandomErasing, parse_rand_augment
from pipeline.data.transforms import TrainTransform
from pipeline.errors import ConfigError

RECIPE = "rand-m7-n4-mstd0.5-inc1"


@pytest.fixture(scope="module")
def timm_aa() -> types.ModuleType:
    """timm's auto_augment.py loaded on its own (it imports only PIL and numpy), not through timm's package, which
    would import torchvision's C extension."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm (a dev dependency) is not installed")
    path = Path(spec.origin).parent / "data" / "auto_augment.py"
    module_spec = importlib.util.spec_from_file_location("timm_auto_augment", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tv_functional() -> types.ModuleType:
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    return pytest.importorskip("torchvision.transforms.v2.functional")


def textured_clip(frames: int = 3, height: int = 36, width: int = 44, seed: int = 0) -> np.ndarray:
    """Frames that differ from each other, with gradients and noise, so every op has something to change."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
    clip = ramp[None] + rng.normal(0, 20, (frames, height, width, 3)) + np.arange(frames)[:, None, None, None] * 9
    return np.clip(clip, 0, 255).astype(np.uint8)


def test_the_recipe_string_means_what_timm_means(timm_aa):
    for spec_string in (RECIPE, "rand-m9-n3-mstd0.5", "rand-m10-n2-mstd101-p0.7", "rand-m5-n1-inc1-mmax15"):
        ours = parse_rand_augment(spec_string)
        theirs = timm_aa.rand_augment_transform(spec_string, {"interpolation": Image.BICUBIC})
        assert [op.name for op in theirs.ops] == list(ours.ops), spec_string
        assert theirs.num_layers == ours.num_layers
        for op in theirs.ops:
            assert (op.magnitude, op.magnitude_std, op.prob) == (ours.magnitude, ours.magnitude_std, ours.prob)
            assert (op.magnitude_max or timm_aa._LEVEL_DENOM) == ours.magnitude_max
    assert parse_rand_augment("") is None
    with pytest.raises(ValueError, match="cannot read 'x3'"):
        parse_rand_augment("rand-m7-x3")


def test_every_op_and_its_arguments_match_timm_frame_by_frame(timm_aa):
    clip = textured_clip()
    resample = Image.BICUBIC
    for name in sorted(set(augment.RAND_TRANSFORMS) | set(augment.RAND_INCREASING_TRANSFORMS)):
        for level in (0.0, 3.3, 7.0, 10.0):
            random.seed(1)  # timm negates with the global `random`: its value must be one of our two signs
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            (theirs,) = level_fn(level, {}) if level_fn is not None else (None,)
            ours = {augment._LEVEL_ARGS[name](level, np.random.default_rng(seed)) for seed in range(16)}
            assert any(value == theirs or value == pytest.approx(theirs) for value in ours), (name, level, ours)
            args = () if theirs is None else (theirs,)
            if name.startswith("Posterize") and theirs == 0:  # Pillow 13 refuses 0 bits; older Pillow gave black
                expected = [np.zeros_like(frame) for frame in clip]
            else:
                expected = [
                    np.asarray(
                        timm_aa.NAME_TO_OP[name](Image.fromarray(f), *args, fillcolor=augment.FILL, resample=resample)
                    )
                    for f in clip
                ]
            got = augment._to_clip(augment._OPS[name](augment._to_frames(clip), theirs, resample))
            assert np.array_equal(got, np.stack(expected)), (name, level)


def test_rand_augment_draws_once_per_clip_for_every_frame_and_is_reproducible():
    rand_augment = RandAugment(parse_rand_augment(RECIPE), "bicubic")
    still = np.repeat(textured_clip(frames=1), 4, axis=0)  # four equal frames stay equal only under one draw
    changed = 0
    for seed in range(12):
        out = rand_augment(still, np.random.default_rng(seed))
        assert out.shape == still.shape and out.dtype == np.uint8
        assert all(np.array_equal(out[0], frame) for frame in out[1:]), seed
        changed += not np.array_equal(out, still)
        again = rand_augment(still, np.random.default_rng(seed))
        assert np.array_equal(out, again)
    assert changed >= 8
    rng = np.random.default_rng(0)  # the repeated-augmentation clips of a video draw one after the other
    draws = [rand_augment.draw(rng) for _ in range(6)]
    assert len({repr(draw) for draw in draws}) == 6


def test_rand_augment_runs_as_a_train_transform_augment_after_crop_and_flip():
    transform = TrainTransform(
        crop_size=32,
        short_side=(36, 40),
        random_resized_crop=False,
        crop_area=(0.08, 1.0),
        crop_aspect=(0.75, 1.33),
        flip=True,
        augments=augment.clip_augments(RECIPE, "bicubic", 0.0),
        interpolation="bicubic",
    )
    clip = textured_clip(frames=4)
    first, second = transform(clip, np.random.default_rng(3)), transform(clip, np.random.default_rng(3))
    assert first.shape == (4, 32, 32, 3) and np.array_equal(first, second)


def test_colour_jitter_is_torchvisions_on_every_frame(tv_functional):
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.1)
    clip = textured_clip(frames=3)
    names = ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue")
    for seed in range(5):
        ops = jitter.draw(np.random.default_rng(seed))
        assert sorted(op for op, _ in ops) == [0, 1, 2, 3]
        assert all(0.6 <= f <= 1.4 for op, f in ops if op < 3) and all(-0.1 <= f <= 0.1 for op, f in ops if op == 3)
        frames = [Image.fromarray(frame) for frame in clip]
        for op, factor in ops:
            frames = [getattr(tv_functional, names[op])(frame, factor) for frame in frames]
        expected = np.stack([np.asarray(frame) for frame in frames])
        assert np.array_equal(jitter(clip, np.random.default_rng(seed)), expected)
    still = np.repeat(clip[:1], 3, axis=0)
    out = jitter(still, np.random.default_rng(9))
    assert all(np.array_equal(out[0], frame) for frame in out[1:])


def test_random_erasing_erases_one_box_through_every_frame():
    clips = torch.zeros(6, 3, 4, 24, 32)
    torch.manual_seed(0)
    erased = RandomErasing(1.0, "pixel", 1, np.random.default_rng(0))(clips.clone())
    for clip in erased:
        mask = clip != 0
        assert mask.any()
        assert all(torch.equal(mask[:, 0], mask[:, t]) for t in range(1, 4))  # the same box in every frame
        rows, cols = mask[0, 0].nonzero(as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 0.02 * 24 * 32 * 0.9 <= box <= 24 * 32 / 3 * 1.1  # timm's 2–33% of the frame
        assert not torch.equal(clip[:, 0][mask[:, 0]], clip[:, 1][mask[:, 1]])  # fresh noise per frame, as PySlowFast
    noise = RandomErasing(1.0, "pixel", 1, np.random.default_rng(1))(torch.zeros(64, 3, 2, 64, 64))
    values = noise[noise != 0]
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02  # N(0, 1) in normalised units
    torch.manual_seed(0)
    again = RandomErasing(1.0, "pixel", 1, np.random.default_rng(0))(clips.clone())
    assert torch.equal(erased, again)
    ones = torch.ones(8, 3, 2, 24, 32)
    const = RandomErasing(1.0, "const", 1, np.random.default_rng(0))(ones.clone())
    assert (const == 0).any() and set(const.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(RandomErasing(0.0, "pixel", 1, np.random.default_rng(0))(ones.clone()), ones)


def test_bicubic_crop_resize_keeps_uint8_and_flat_colour():
    flat = np.full((2, 50, 70, 3), 77, dtype=np.uint8)
    for interpolation in ("bilinear", "bicubic"):
        transform = TrainTransform(32, (36, 40), False, (0.08, 1.0), (0.75, 1.33), False, (), interpolation)
        out = transform(flat, np.random.default_rng(0))
        assert out.dtype == np.uint8 and (out == 77).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.augment.rand_augment=rand-m7-x3", "data.augment.rand_augment"),
        ("data.augment.erase_mode=blur", "data.augment.erase_mode"),
        ("data.augment.erase_prob=1.5", "data.augment.erase_prob"),
        ("train.accumulate_steps=0", "train.accumulate_steps"),
        ("train.model_to_log=ema", "train.model_to_log"),
        ("train.layer_decay=0", "train.layer_decay"),
        ("train.layer_decay=0.75", "model.pretrained"),
        ("train.ema_decay=1.0", "train.ema_decay"),
    ],
)
def test_bad_recipe_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])
    with pytest.raises(ConfigError, match="color_jitter"):
        load_config(overrides=[f"data.augment.rand_augment={RECIPE}", "data.augment.color_jitter=0.4"])
