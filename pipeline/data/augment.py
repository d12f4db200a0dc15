"""The paper's clip augmentations: RandAugment, colour jitter and random erasing, one draw per clip.

Each operation samples its parameters once per clip and applies them to every frame, as PySlowFast does for video;
the repeated-augmentation clips of a video each get their own draw. Randomness comes from the generator passed in,
so a clip's augmentation is reproducible for a seed.

- RandAugment follows timm's definition of strings such as ``rand-m7-n4-mstd0.5-inc1`` (magnitude 7, 4 ops chosen
  with replacement, magnitude noise of std 0.5, the "increasing severity" op set), each op applied with probability
  0.5 and its arguments mapped from the magnitude as timm maps them. The ops are Pillow's, called per frame with the
  clip's arguments, exactly the calls timm and PySlowFast make (fill grey 128, PySlowFast's choice).
- Colour jitter is torchvision's ``ColorJitter(b, c, s, h)``: factors drawn uniformly, the four ops in a random order,
  Pillow's enhancers as torchvision uses them on images.
- Random erasing (timm's and PySlowFast's ``RandomErasing`` with ``cube=True``: the same box in every frame) works on
  normalised float clips, so it runs on the training device after normalisation, where its noise is exact.

RandAugment and colour jitter run on the decode CPUs as ``TrainTransform`` augments (see BENCHMARKS.md for what they
cost there, measured against decoding).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: the magnitude scale's top
FILL = (128, 128, 128)  # PySlowFast's create_random_augment passes no img_mean: timm's default grey
OP_PROB = 0.5  # timm's rand_augment_ops default
ERASE_MODES = ("pixel", "rand", "const")
INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}

Frames = list[Image.Image]


def _negate_half(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value  # timm's _randomly_negate


def _affine(frames: Frames, matrix: tuple[float, ...], resample: int) -> Frames:
    return [frame.transform(frame.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL) for frame in frames]


def _solarize_add(frames: Frames, add: int) -> Frames:
    lut = [min(255, i + add) if i < 128 else i for i in range(256)] * 3
    return [frame.point(lut) for frame in frames]


def _posterize(frames: Frames, bits: int) -> Frames:
    """Keep `bits` high bits; 0 bits is black (Pillow < 12 did that; Pillow 13 refuses 0, which timm can ask for)."""
    if bits >= 8:
        return frames
    if bits <= 0:
        return [Image.new(frame.mode, frame.size) for frame in frames]
    return [ImageOps.posterize(frame, bits) for frame in frames]


def _enhance(kind: type) -> Callable[[Frames, float, int], Frames]:
    return lambda frames, factor, _: [kind(frame).enhance(factor) for frame in frames]


# name: (level → argument, op on the frames with that argument and the resampling filter); timm's tables.
_LEVEL_ARGS: dict[str, Callable[[float, np.random.Generator], float | int | None]] = {
    "AutoContrast": lambda level, rng: None,
    "Equalize": lambda level, rng: None,
    "Invert": lambda level, rng: None,
    "Rotate": lambda level, rng: _negate_half(level / MAX_LEVEL * 30.0, rng),
    "Posterize": lambda level, rng: int(level / MAX_LEVEL * 4),
    "PosterizeIncreasing": lambda level, rng: 4 - int(level / MAX_LEVEL * 4),
    "Solarize": lambda level, rng: min(256, int(level / MAX_LEVEL * 256)),
    "SolarizeIncreasing": lambda level, rng: 256 - min(256, int(level / MAX_LEVEL * 256)),
    "SolarizeAdd": lambda level, rng: min(128, int(level / MAX_LEVEL * 110)),
    "Color": lambda level, rng: level / MAX_LEVEL * 1.8 + 0.1,
    "Contrast": lambda level, rng: level / MAX_LEVEL * 1.8 + 0.1,
    "Brightness": lambda level, rng: level / MAX_LEVEL * 1.8 + 0.1,
    "Sharpness": lambda level, rng: level / MAX_LEVEL * 1.8 + 0.1,
    "ShearX": lambda level, rng: _negate_half(level / MAX_LEVEL * 0.3, rng),
    "ShearY": lambda level, rng: _negate_half(level / MAX_LEVEL * 0.3, rng),
    "TranslateXRel": lambda level, rng: _negate_half(level / MAX_LEVEL * 0.45, rng),
    "TranslateYRel": lambda level, rng: _negate_half(level / MAX_LEVEL * 0.45, rng),
}
for _name in ("Color", "Contrast", "Brightness", "Sharpness"):  # 1 ± level·0.9: severity grows with the level
    _LEVEL_ARGS[f"{_name}Increasing"] = lambda level, rng: max(0.1, 1.0 + _negate_half(level / MAX_LEVEL * 0.9, rng))

_OPS: dict[str, Callable[[Frames, object, int], Frames]] = {
    "AutoContrast": lambda frames, _, __: [ImageOps.autocontrast(frame) for frame in frames],
    "Equalize": lambda frames, _, __: [ImageOps.equalize(frame) for frame in frames],
    "Invert": lambda frames, _, __: [ImageOps.invert(frame) for frame in frames],
    "Rotate": lambda frames, degrees, resample: [
        frame.rotate(degrees, resample=resample, fillcolor=FILL) for frame in frames
    ],
    "Posterize": lambda frames, bits, _: _posterize(frames, bits),
    "Solarize": lambda frames, thresh, _: [ImageOps.solarize(frame, thresh) for frame in frames],
    "SolarizeAdd": lambda frames, add, _: _solarize_add(frames, add),
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda frames, factor, resample: _affine(frames, (1, factor, 0, 0, 1, 0), resample),
    "ShearY": lambda frames, factor, resample: _affine(frames, (1, 0, 0, factor, 1, 0), resample),
    "TranslateXRel": lambda frames, pct, resample: _affine(frames, (1, 0, pct * frames[0].size[0], 0, 1, 0), resample),
    "TranslateYRel": lambda frames, pct, resample: _affine(frames, (1, 0, 0, 0, 1, pct * frames[0].size[1]), resample),
}
for _name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"):
    _OPS[f"{_name}Increasing"] = _OPS[_name]

RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip


@dataclass(frozen=True)
class RandAugmentSpec:
    """What a ``rand-...`` string means: ops to choose from, how many per clip, the magnitude and its noise."""

    ops: tuple[str, ...]
    num_layers: int
    magnitude: float
    magnitude_std: float
    magnitude_max: float
    prob: float


def parse_rand_augment(spec: str) -> RandAugmentSpec | None:
    """timm's grammar: ``rand`` then ``-``-separated ``m<int>``, ``n<int>``, ``mstd<float>`` (> 100: uniform),
    ``mmax<int>``, ``inc<0|1>``, ``p<float>``. None for ""; ValueError naming the part it cannot read."""
    if not spec:
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"'{spec}' does not start with 'rand'")
    fields = {"m": 10.0, "n": 2.0, "mstd": 0.0, "mmax": MAX_LEVEL, "inc": 0.0, "p": OP_PROB}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", part)
        if match is None:
            raise ValueError(f"'{spec}': cannot read '{part}' (expected m, n, mstd, mmax, inc or p and a number)")
        fields[match.group(1)] = float(match.group(2))
    std = math.inf if fields["mstd"] > 100 else fields["mstd"]
    ops = RAND_INCREASING_TRANSFORMS if fields["inc"] else RAND_TRANSFORMS
    return RandAugmentSpec(ops, int(fields["n"]), int(fields["m"]), std, fields["mmax"], fields["p"])


def _to_frames(clip: np.ndarray) -> Frames:
    return [Image.fromarray(frame) for frame in clip]


def _to_clip(frames: Frames) -> np.ndarray:
    return np.stack([np.asarray(frame) for frame in frames])


@dataclass(frozen=True)
class RandAugment:
    """RandAugment of a uint8 clip (T, H, W, 3): one draw of ops, magnitudes and signs for all of its frames."""

    spec: RandAugmentSpec
    interpolation: str  # bilinear | bicubic | random (timm: a random one of the two per op)

    def draw(self, rng: np.random.Generator) -> list[tuple[str, object, int]]:
        """The ops this clip gets, each with its argument and resampling filter (timm's sampling order)."""
        chosen = []
        for index in rng.integers(0, len(self.spec.ops), self.spec.num_layers):
            name = self.spec.ops[index]
            if self.spec.prob < 1.0 and rng.random() > self.spec.prob:
                continue
            magnitude = self.spec.magnitude
            if self.spec.magnitude_std == math.inf:
                magnitude = rng.uniform(0, magnitude)
            elif self.spec.magnitude_std > 0:
                magnitude = rng.normal(magnitude, self.spec.magnitude_std)
            magnitude = max(0.0, min(magnitude, self.spec.magnitude_max))
            resample = INTERPOLATION.get(self.interpolation) or list(INTERPOLATION.values())[int(rng.integers(2))]
            chosen.append((name, _LEVEL_ARGS[name](magnitude, rng), resample))
        return chosen

    def __call__(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ops = self.draw(rng)
        if not ops:
            return clip
        frames = _to_frames(clip)
        for name, argument, resample in ops:
            frames = _OPS[name](frames, argument, resample)
        return _to_clip(frames)


def _hue(frame: Image.Image, shift: float) -> Image.Image:
    """torchvision's PIL adjust_hue: rotate the HSV hue channel by `shift` turns (uint8 wrap-around)."""
    hue, saturation, value = frame.convert("HSV").split()
    rotated = np.asarray(hue, dtype=np.uint8) + np.uint8(int(shift * 255) % 256)  # wraps, as torchvision's does
    return Image.merge("HSV", (Image.fromarray(rotated, "L"), saturation, value)).convert("RGB")


@dataclass(frozen=True)
class ColorJitter:
    """torchvision's ColorJitter: brightness, contrast, saturation factors in [max(0, 1 - s), 1 + s], hue shift in
    [-h, h], applied in a random order, one draw per clip."""

    brightness: float
    contrast: float
    saturation: float
    hue: float = 0.0

    def draw(self, rng: np.random.Generator) -> list[tuple[int, float]]:
        """(op index, factor) in application order: 0 brightness, 1 contrast, 2 saturation, 3 hue."""
        ranges = [(max(0.0, 1 - s), 1 + s) if s else None for s in (self.brightness, self.contrast, self.saturation)]
        ranges.append((-self.hue, self.hue) if self.hue else None)
        order = rng.permutation(4)
        factors = [float(rng.uniform(*bounds)) if bounds else None for bounds in ranges]
        return [(int(op), factors[op]) for op in order if factors[op] is not None]

    def __call__(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ops = self.draw(rng)
        if not ops:
            return clip
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        frames = _to_frames(clip)
        for op, factor in ops:
            if op == 3:
                frames = [_hue(frame, factor) for frame in frames]
            else:
                frames = [enhancers[op](frame).enhance(factor) for frame in frames]
        return _to_clip(frames)


def clip_augments(
    rand_augment: str, rand_augment_interpolation: str, color_jitter: float
) -> tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...]:
    """The decode-side augments of a config: RandAugment, or colour jitter (timm applies colour jitter only without
    RandAugment; the config refuses both at once)."""
    spec = parse_rand_augment(rand_augment)
    if spec is not None:
        return (RandAugment(spec, rand_augment_interpolation),)
    if color_jitter > 0:
        return (ColorJitter(color_jitter, color_jitter, color_jitter),)
    return ()


@dataclass
class RandomErasing:
    """Random erasing of normalised clips (B, C, T, H, W) in place: per clip, with `prob`, 1 to `max_count` boxes of
    2–33% of the frame (aspect 0.3–3.3, 100 tries), the same box in every frame, filled with N(0, 1) noise per pixel
    (`pixel`), per channel and frame (`rand`) or zeros (`const`). Boxes come from `rng` on the host: no device sync.
    """

    prob: float
    mode: str
    max_count: int
    rng: np.random.Generator
    min_area: float = 0.02
    max_area: float = 1 / 3
    log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))

    def boxes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(top, left, h, w) of the boxes of one clip: timm's `_erase_cube` draws."""
        if self.rng.random() > self.prob:
            return []
        count = 1 if self.max_count == 1 else int(self.rng.integers(1, self.max_count + 1))
        found = []
        for _ in range(count):
            for _ in range(100):
                area = self.rng.uniform(self.min_area, self.max_area) * height * width / count
                aspect = math.exp(self.rng.uniform(*self.log_aspect))
                box_h, box_w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if box_w < width and box_h < height:
                    top, left = (
                        int(self.rng.integers(0, height - box_h + 1)),
                        int(self.rng.integers(0, width - box_w + 1)),
                    )
                    found.append((top, left, box_h, box_w))
                    break
        return found

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        channels, frames, height, width = clips.shape[1:]
        for index in range(clips.shape[0]):
            for top, left, box_h, box_w in self.boxes(height, width):
                shape: Sequence[int] = {
                    "pixel": (channels, frames, box_h, box_w),
                    "rand": (channels, frames, 1, 1),
                    "const": (channels, 1, 1, 1),
                }[self.mode]
                fill = clips.new_empty(shape).normal_() if self.mode != "const" else clips.new_zeros(shape)
                clips[index, :, :, top : top + box_h, left : left + box_w] = fill
        return clips
