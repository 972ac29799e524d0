"""Augmentation presets: typed data, one place for every number (the paper's Section 4.1 and 4.5).

A preset says *what* to do to each view; ``pipelines.dali`` (DALI, CPU or GPU) and
``pipelines.reference`` (torchvision) say *how*. Both read only these fields, so they stay in step.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

# Views (K) per image the pipelines build; training needs at least 2.
MAX_VIEWS = 16


@dataclass(frozen=True)
class AugPreset:
    name: str
    # Random resized crop (scale is the area fraction, ratio the aspect range), torchvision semantics.
    crop: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    # Colour jitter as torchvision's ColorJitter(b, c, s, h), applied with probability jitter_p.
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    # Gaussian blur with sigma ~ U(blur_sigma), applied with probability blur_p (SimSiam uses 0.5).
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # RandAugment(n, m) with torchvision's 31 magnitude bins; n=0 disables it.
    randaugment_n: int = 0
    randaugment_m: int = 5
    randaugment_bins: int = 31
    # Jigsaw: cut each view into grid x grid tiles and put them back in a random order; 0 disables.
    jigsaw_grid: int = 0
    # Evaluation only: resize the shorter side to resize_ratio * size, then centre-crop to size.
    resize_ratio: float = 1.0

    def replace(self, **overrides) -> AugPreset:
        """A copy with some fields changed; unknown fields fail, listing the close matches."""
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ValueError(f"unknown augmentation preset field {key!r}{hint}")
        return dataclasses.replace(self, **overrides)

    @property
    def has_color(self) -> bool:
        return self.jitter_p > 0 or self.grayscale_p > 0


DEFAULT = AugPreset(name="default")
# 'strong': brightness, contrast and saturation ranges widened by 0.4, blur sigma in [0.2, 3.0].
STRONG = DEFAULT.replace(name="strong", brightness=0.8, contrast=0.8, saturation=0.8, blur_sigma=(0.2, 3.0))
# 'very strong': strong plus RandAugment(2, 5) and a 4x4 jigsaw.
VERY_STRONG = STRONG.replace(name="very_strong", randaugment_n=2, randaugment_m=5, jigsaw_grid=4)
# Linear evaluation training: random resized crop (torchvision's default scale) and flip only.
LINEAR = AugPreset(
    name="linear",
    crop_scale=(0.08, 1.0),
    jitter_p=0.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
)
# Evaluation (kNN bank and test, linear test): no randomness; resize + centre crop only.
EVAL = LINEAR.replace(name="eval", crop=False, flip_p=0.0)

PRESETS: dict[str, AugPreset] = {p.name: p for p in (DEFAULT, STRONG, VERY_STRONG, LINEAR, EVAL)}


def get_preset(name: str | AugPreset, **overrides) -> AugPreset:
    """Look a preset up by name and apply field overrides."""
    if isinstance(name, AugPreset):
        return name.replace(**overrides) if overrides else name
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown augmentation preset {name!r}{hint}; known: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return preset.replace(**overrides) if overrides else preset


# The normalisation every consumer applies to the uint8 views (ImageNet statistics, as SimSiam).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
