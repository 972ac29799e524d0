"""Augmentation presets: typed data, one place for every number (the paper's Section 4.1 and 4.5).

A preset says *what* to do to each view; ``pipelines.dali`` (DALI, CPU or GPU) and
``pipelines.reference`` (torchvision) say *how*. Both read only these fields, and both apply the
stages in the one order ``AugPreset.stages`` gives (``STAGE_ORDER``), so they stay in step.

Where each number comes from (details, and the runs of the other readings: docs/augmentations.md).
The paper's text (Sections 4.1 and 4.5) gives: default = crop, flip, colour jitter "with the same
parameters as in [13, 14]", grayscale and blur with sigma in [0.1, 2.0] (no probability:
``blur_p=0.5`` is SimSiam's [14], the project's reading); strong = jitter ranges +0.4 and sigma in
[0.2, 3.0]; very strong = "RandAugment(2,5) [17] and jigsaw with 4x4 grids [45, 15] were added",
without saying to which setting: building it on strong (not default) is the project's reading
(default's base: preset_overrides brightness/contrast/saturation 0.4, blur_sigma [0.1, 2.0]).
It names no implementation, no probability and no order for either, so every choice below is the
project's:

RandAugment magnitude: ``randaugment_m`` is a bin of ``randaugment_bins`` equally spaced magnitudes
from 0 to each operation's maximum, torchvision's convention (``RandAugment(num_ops, magnitude,
num_magnitude_bins=31)``, 14 operations): with the default 31 bins, M=5 is 5/30 = 1/6 of the
maximum (Rotate 5 degrees of 30), a mild reading. The TensorFlow RandAugment in tensorflow/tpu
(models/official/efficientnet/autoaugment.py) divides M by 10 (M=5: half of each maximum, Rotate
15 degrees): ``randaugment_bins=11`` gives that scale (the 14 operations stay torchvision's).

Jigsaw: ``jigsaw_mode='global'`` shuffles all grid x grid tiles uniformly (Noroozi and Favaro, the
paper's [45]); ``'local'`` is the region confusion of Chen et al. (DCL, the paper's [15]): each row
of tiles is reordered by sorting ``i + U(-k, k)``, then each column likewise, with k =
``JIGSAW_LOCAL_K`` = 1 (the project's choice), so a tile moves at most one place along each axis.
The defaults (``jigsaw_p=1``, global) apply the full shuffle to every very-strong view, the
harshest reading. DSSL's public code (the paper's [4]) shuffles a 4x4 grid with probability 0.1, on
its heavily augmented views only: ``jigsaw_p=0.1``; ``jigsaw_mode='local'`` gives [15]'s milder
displacement.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

# Views (K) per image the pipelines build; training needs at least 2.
# data.cpu_kernels: how the CPU pipeline runs its stages (pipelines/kernels/__init__.py reads it)
CPU_KERNELS = ("auto", "numba", "gpu_graph")
MAX_VIEWS = 16
# The order of the stages of a view, for every back end. 'colour' is colour jitter (p=jitter_p)
# then grayscale (p=grayscale_p), torchvision's ColorJitter then RandomGrayscale.
STAGE_ORDER = ("crop", "flip", "colour", "blur", "randaugment", "jigsaw")
JIGSAW_MODES = ("global", "local")
JIGSAW_LOCAL_K = 1.0


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
    # RandAugment(n, m), m a bin of randaugment_bins (31: torchvision's scale, 11: M/10 as in
    # tensorflow/tpu's RandAugment, see the module docstring); n=0 disables it.
    randaugment_n: int = 0
    randaugment_m: int = 5
    randaugment_bins: int = 31
    # Jigsaw: cut each view into grid x grid tiles and move them (jigsaw_mode, see the module
    # docstring), applied with probability jigsaw_p; grid 0 disables it.
    jigsaw_grid: int = 0
    jigsaw_p: float = 1.0
    jigsaw_mode: str = "global"
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

    def __post_init__(self):
        if self.jigsaw_mode not in JIGSAW_MODES:
            raise ValueError(f"jigsaw_mode must be one of {', '.join(JIGSAW_MODES)}, got {self.jigsaw_mode!r}")
        if self.randaugment_n > 0 and not 0 <= self.randaugment_m < self.randaugment_bins:
            raise ValueError(
                f"randaugment_m={self.randaugment_m} must be a bin in 0..{self.randaugment_bins - 1} "
                f"(randaugment_bins={self.randaugment_bins})"
            )
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "jigsaw_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        for name in ("brightness", "contrast", "saturation"):  # torchvision's ColorJitter's ranges
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0 (the jitter is 1 +- it), got {getattr(self, name)!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (a fraction of the colour circle), got {self.hue!r}")
        scale, ratio = tuple(self.crop_scale), tuple(self.crop_ratio)
        if not (len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(
                f"crop_scale must be (low, high) with 0 < low <= high <= 1 (an area fraction), got {self.crop_scale!r}"
            )
        if not (len(ratio) == 2 and 0.0 < ratio[0] <= ratio[1] < float("inf")):
            raise ValueError(
                f"crop_ratio must be (low, high) with 0 < low <= high (width / height), got {self.crop_ratio!r}"
            )
        for name in ("randaugment_n", "jigsaw_grid"):  # 0 turns the stage off; a negative count means nothing
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: off), got {value!r}")
        if not 1.0 <= self.resize_ratio < float("inf"):
            raise ValueError(
                "resize_ratio must be >= 1 (resize to ratio * size, then centre-crop to size), "
                f"got {self.resize_ratio!r}"
            )
        sigma = tuple(self.blur_sigma)  # the blur kernels size a view's taps from the upper end
        if self.blur_p > 0 and not (len(sigma) == 2 and 0.0 < sigma[0] <= sigma[1]):
            raise ValueError(f"blur_sigma must be (lo, hi) with 0 < lo <= hi, got {self.blur_sigma!r}")

    @property
    def has_color(self) -> bool:
        return self.jitter_p > 0 or self.grayscale_p > 0

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this preset uses, in ``STAGE_ORDER``."""
        on = {
            "crop": True,  # random resized crop, or the deterministic resize + centre crop
            "flip": self.flip_p > 0,
            "colour": self.jitter_p > 0 or self.grayscale_p > 0,
            "blur": self.blur_p > 0,
            "randaugment": self.randaugment_n > 0,
            "jigsaw": self.jigsaw_grid > 0 and self.jigsaw_p > 0,
        }
        return tuple(name for name in STAGE_ORDER if on[name])


DEFAULT = AugPreset(name="default")
# 'strong': brightness, contrast and saturation ranges widened by 0.4, blur sigma in [0.2, 3.0].
STRONG = DEFAULT.replace(name="strong", brightness=0.8, contrast=0.8, saturation=0.8, blur_sigma=(0.2, 3.0))
# 'very strong': RandAugment(2, 5) and a 4x4 jigsaw (Section 4.5) added to strong; the base being strong,
# the magnitude scale (31 bins), jigsaw_p=1 and the global shuffle are the project's readings (module
# docstring).
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


def check_views(views, minimum: int = 1) -> None:
    """The number of views K: an integer in minimum..MAX_VIEWS (the pipelines make 1 or more,
    training needs 2 or more). The one home of this rule (config, losses, loaders, pipelines)."""
    if isinstance(views, bool) or not isinstance(views, int) or not minimum <= views <= MAX_VIEWS:
        raise ValueError(f"views (K) must be an integer in {minimum}..{MAX_VIEWS}, got {views!r}")


def check_jigsaw(size: int, grid: int) -> None:
    """The jigsaw cuts a size x size view into grid x grid equal tiles."""
    if grid > 0 and size % grid:
        raise ValueError(
            f"image size {size} is not divisible by the jigsaw grid {grid}: pick image_size a "
            f"multiple of {grid} (e.g. {grid * max(1, round(size / grid))}) or set jigsaw_grid=0"
        )


def pipeline_bytes(preset: AugPreset, size: int, images: int, views: int, queue_depth: int = 2) -> int:
    """Projected device memory of the GPU pipeline (``pipelines.fused``) for ``images`` images of
    ``views`` views each: every buffer a view passes through is size x size x 3 uint8 -- the crop,
    the stacked frame, one output per fused stage (RandAugment + jigsaw, one stage, two: its output
    and scratch frames), the CHW transpose and the slice handed out -- plus the decoded image (taken
    as 2 size^2 x 3: a source whose shorter side is 8/7 of the view at 4:3), all held once per
    queue slot. A model, not a measurement: ``tools/bench_gpu_graph.py`` weighs the same graph on
    the CPU."""
    plane = size * size * 3
    buffers = 4 + sum(1 for name in preset.stages if name in ("colour", "blur"))
    buffers += 2 if {"randaugment", "jigsaw"} & set(preset.stages) else 0
    return queue_depth * images * (2 * plane + views * buffers * plane)


def check_gpu_memory(preset: AugPreset, size: int, images: int, views: int, limit_gb: float | None) -> None:
    """Refuse a pipeline whose projected memory (``pipeline_bytes``) exceeds ``limit_gb`` (the
    config key ``data.gpu_memory_gb``; None: no limit)."""
    if limit_gb is None:
        return
    need = pipeline_bytes(preset, size, images, views) / 2**30
    if need > limit_gb:
        # as many decimals as it takes for the printed need to exceed the limit (0.0 GB > 0.001 reads wrong)
        shown = next((f"{need:.{d}f}" for d in range(1, 10) if float(f"{need:.{d}f}") > limit_gb), f"{need!r}")
        raise ValueError(
            f"data.preset={preset.name!r} at {size}x{size} with a batch of {images} images x {views} views per "
            f"GPU projects {shown} GB of pipeline memory, more than data.gpu_memory_gb={limit_gb:g}: lower "
            f"batch_size or views, use more processes, or raise data.gpu_memory_gb"
        )


# The normalisation every consumer applies to the uint8 views (ImageNet statistics, as SimSiam).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
