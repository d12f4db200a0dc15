"""Spatial transforms of uint8 clips (T, H, W, 3), the same for every frame of a clip.

Clips stay uint8 all the way through Ray Data; normalising to float happens on the training device, which moves
4× fewer bytes through the object store. Training crops pick a box in the source frame and resize only that box
(a short-side scale jitter followed by a random crop is the same as a random box whose side is crop / scale).
The box is drawn from the frame size alone (`TrainTransform.box`), so the clip pipeline can draw it before decoding
and, when the box is larger than the output, have the decoder convert straight to the output size
(`pipeline.data.video.FrameCrop`); `finish` then does the rest. RandAugment and colour jitter
(`pipeline.data.augment`) plug in as `augments`: functions of (clip, rng) run after crop and flip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ClipAugment = Callable[[np.ndarray, np.random.Generator], np.ndarray]
Box = tuple[int, int, int, int]  # top, left, height, width


def resize(clip: np.ndarray, height: int, width: int, mode: str = "bilinear") -> np.ndarray:
    """Bilinear or bicubic resize with antialiasing, uint8 in and out (bicubic overshoot is clamped to 0–255)."""
    if clip.shape[1:3] == (height, width):
        return clip
    frames = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2)  # a channels-last view, no copy
    if mode == "bicubic":  # torch's uint8 path is bilinear only
        frames = frames.float()
    resized = F.interpolate(frames, size=(height, width), mode=mode, antialias=True, align_corners=False)
    if resized.dtype != torch.uint8:
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(resized.permute(0, 2, 3, 1).numpy())


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side `size`, keeping the aspect ratio."""
    if height <= width:
        return size, max(round(width * size / height), size)
    return max(round(height * size / width), size), size


def short_side_resize(clip: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is `size`, keeping the aspect ratio."""
    return resize(clip, *short_side_size(*clip.shape[1:3], size))


def crop(clip: np.ndarray, box: Box) -> np.ndarray:
    top, left, height, width = box
    return clip[:, top : top + height, left : left + width]


def horizontal_flip(clip: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(clip[:, :, ::-1])


def spatial_crops(clip: np.ndarray, size: int, num_crops: int) -> list[np.ndarray]:
    """One centre crop, or three (start, centre, end) along the longer side, of a clip at least `size` square."""
    height, width = clip.shape[1:3]
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    if min(height, width) < size:
        raise ValueError(f"a {height}x{width} clip is smaller than the {size} crop")
    centre = ((height - size) // 2, (width - size) // 2)
    if num_crops == 1:
        offsets = [centre]
    elif height > width:
        offsets = [(0, centre[1]), centre, (height - size, centre[1])]
    else:
        offsets = [(centre[0], 0), centre, (centre[0], width - size)]
    return [np.ascontiguousarray(crop(clip, (top, left, size, size))) for top, left in offsets]


def scale_jitter_box(
    height: int, width: int, crop_size: int, short_side: tuple[int, int], rng: np.random.Generator
) -> Box:
    """The source box that scaling the short side to a random length in `short_side` and cropping crop_size shows."""
    low, high = short_side
    if not crop_size <= low <= high:
        raise ValueError(f"short-side range {short_side} must be ordered and at least the crop size {crop_size}")
    scaled_short = int(rng.integers(low, high + 1))
    side = min(round(crop_size * min(height, width) / scaled_short), height, width)
    return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side, side


def inception_box(
    height: int,
    width: int,
    area: tuple[float, float],
    aspect: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> Box:
    """Inception-style box: a random fraction `area` of the frame, random aspect (log-uniform) in `aspect`.

    After `attempts` misses it falls back to the largest centred box whose aspect is within range.
    """
    for _ in range(attempts):
        target = height * width * rng.uniform(*area)
        ratio = float(np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1]))))
        box_width, box_height = round(np.sqrt(target * ratio)), round(np.sqrt(target / ratio))
        if 0 < box_width <= width and 0 < box_height <= height:
            return (
                int(rng.integers(0, height - box_height + 1)),
                int(rng.integers(0, width - box_width + 1)),
                box_height,
                box_width,
            )
    ratio = min(max(width / height, aspect[0]), aspect[1])
    box_height, box_width = (height, round(height * ratio)) if width / height > ratio else (round(width / ratio), width)
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


@dataclass(frozen=True)
class TrainTransform:
    """Random box (scale jitter, or inception-style with `random_resized_crop`) → crop_size², flip, augments."""

    crop_size: int
    short_side: tuple[int, int]
    random_resized_crop: bool
    crop_area: tuple[float, float]
    crop_aspect: tuple[float, float]
    flip: bool
    augments: tuple[ClipAugment, ...] = ()
    interpolation: str = "bilinear"  # of the box's resize: bilinear | bicubic

    def __call__(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        box = self.box(*clip.shape[1:3], rng)
        return self.finish(resize(crop(clip, box), self.crop_size, self.crop_size, self.interpolation), rng)

    def box(self, height: int, width: int, rng: np.random.Generator) -> Box:
        """The source box of one clip of a height × width video."""
        if self.random_resized_crop:
            return inception_box(height, width, self.crop_area, self.crop_aspect, rng)
        return scale_jitter_box(height, width, self.crop_size, self.short_side, rng)

    def finish(self, out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Flip and augment a clip already cut to its box and resized to crop_size²."""
        if self.flip and rng.random() < 0.5:
            out = horizontal_flip(out)
        for augment in self.augments:
            out = augment(out, rng)
        return out


@dataclass(frozen=True)
class EvalTransform:
    """Short side resized to `short_side`, then 1 centre crop or 3 crops of crop_size²."""

    short_side: int
    crop_size: int
    num_crops: int

    def __call__(self, clip: np.ndarray) -> list[np.ndarray]:
        return spatial_crops(short_side_resize(clip, self.short_side), self.crop_size, self.num_crops)


class Normalise:
    """uint8 clips (B, T, H, W, C) as Ray Data delivers them → float (B, C, T, H, W), normalised per channel.

    Runs on the device that consumes the clips (the training GPU, a model replica), so that the object store and
    the host-to-device copy carry uint8, a quarter of the bytes.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu") -> None:
        self.mean = torch.tensor(list(mean), device=device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(list(std), device=device).view(1, -1, 1, 1, 1)

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        clips = clips.to(self.mean.device).permute(0, 4, 1, 2, 3).float().div_(255.0)
        return clips.sub_(self.mean).div_(self.std)
