"""The augmentation stages of a view as DALI operators: the GPU pipeline's stages, and the CPU
pipeline's where the Numba kernels (``pipelines.kernels``) are not used.

Each stage is a pure function of a batch of uint8 HWC views (DataNodes) and the preset; every
operator runs where its input lives, and per-sample random parameters (drawn on the CPU, where
DALI draws them) are moved next to the image when needed.
"""

from __future__ import annotations

import warnings

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import rand_augment as dali_rand_augment

from pipelines.kernels.colour_maths import LUMA
from pipelines.kernels.colour_maths import chroma_matrices as _chroma_matrices
from pipelines.kernels.randaugment import MAX_TRANSLATE_REL as RANDAUG_MAX_TRANSLATE_REL
from pipelines.presets import AugPreset


def _near(param, device: str):
    """Move a per-sample CPU parameter next to GPU images (arithmetic needs one placement)."""
    return param.gpu() if device == "gpu" else param


def crop(images, preset: AugPreset, size: int):
    """Random resized crop to size x size, or (no randomness) shorter side to resize_ratio*size
    and a centre crop.

    Antialiased linear resampling, as torchvision's RandomResizedCrop on uint8 tensors: without
    it the crop costs ~25% less here (0.7 vs 0.95 ms per 224x224 view) but aliases large crops.
    """
    if preset.crop:
        return fn.random_resized_crop(
            images,
            size=[size, size],
            random_area=list(preset.crop_scale),
            random_aspect_ratio=list(preset.crop_ratio),
            antialias=True,
        )
    shorter = max(size, int(round(preset.resize_ratio * size)))
    resized = fn.resize(images, resize_shorter=shorter, antialias=True)
    return fn.crop(resized, crop=[size, size])


def grey_mean(images):
    """Per-image mean of the luma (torchvision's contrast centre), a float scalar per sample."""
    channel_mean = fn.reductions.mean(images, axes=[0, 1])  # (3,)
    return fn.reductions.sum(channel_mean * types.Constant(np.float32(LUMA)))


def brightness_contrast_expr(images, scale, shift):
    """round(x * scale + shift) saturated to uint8, as one fused element-wise expression."""
    return fn.cast(images * scale + shift, dtype=types.UINT8)  # cast rounds and saturates


def brightness_contrast(images, b, c, device: str):
    """torchvision's brightness(b) then contrast(c): b * (m + c * (x - m)), m the mean grey.

    On the CPU the per-image centre is an argument of DALI's fused operator (the cheapest path).
    On the GPU m is computed on the GPU, and DALI takes operator arguments only from the CPU, so
    the same formula runs as one element-wise expression there (cheap on a GPU).
    """
    m = grey_mean(images)
    if device == "cpu":
        return fn.brightness_contrast(images, brightness=b, contrast=c, contrast_center=m)
    return brightness_contrast_expr(images, _near(b * c, device), _near(b * (1.0 - c), device) * m)


def _coin(p: float):
    """A per-sample boolean, True with probability p (a predicate for DALI conditionals)."""
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def draw_chroma(preset: AugPreset):
    """Per-sample (saturation factor, hue angle in radians); None for a disabled one."""
    sat = theta = None
    if preset.saturation > 0:
        sat = fn.random.uniform(range=[max(0.0, 1.0 - preset.saturation), 1.0 + preset.saturation])
    if preset.hue > 0:
        theta = fn.random.uniform(range=[-2.0 * np.pi * preset.hue, 2.0 * np.pi * preset.hue])
    return sat, theta


def chroma_matrix(sat, theta, grey: bool):
    """Per-sample 3x3 colour matrix: saturation ``sat`` then a hue rotation by ``theta``."""
    c0, c1, c2, c3 = (types.Constant(m) for m in _chroma_matrices(grey))
    sat = 1.0 if sat is None else sat
    if theta is None:
        return c0 + sat * (c1 + c2)
    return c0 + sat * (c1 + dmath.cos(theta) * c2 + dmath.sin(theta) * c3)


def jitter(images, preset: AugPreset, device: str, *, grey: bool = False):
    """ColorJitter(b, c, s, h) with every factor drawn, always applied (callers pick the samples),
    followed by the grayscale conversion when ``grey``.

    Brightness and contrast are one fused step (exact up to torchvision's intermediate clamp);
    saturation, hue (and grey) are one per-pixel 3x3 matrix (``coord_transform`` over the channel
    axis, rounded and saturated once). The order is fixed (b, c, s, h), where torchvision draws a
    random order per image.
    """
    out = images
    if preset.brightness > 0 or preset.contrast > 0:
        b = fn.random.uniform(range=[max(0.0, 1.0 - preset.brightness), 1.0 + preset.brightness])
        c = fn.random.uniform(range=[max(0.0, 1.0 - preset.contrast), 1.0 + preset.contrast])
        out = brightness_contrast(out, b, c, device)
    if preset.saturation > 0 or preset.hue > 0:
        return fn.coord_transform(out, M=chroma_matrix(*draw_chroma(preset), grey), dtype=types.UINT8)
    return to_grey(out) if grey else out


def to_grey(images):
    """Exact grey, 3 channels: ITU-R 601 luma, rounded once, copied into R, G and B."""
    grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return fn.color_space_conversion(grey, image_type=types.GRAY, output_type=types.RGB)


# From this view side up the colour stage routes views through DALI conditionals (per-pixel work
# dominates); below it one pass over every view is cheaper than splitting and merging batches.
BRANCH_MIN_SIZE = 96
_EYE = np.eye(3, dtype=np.float32)


def _has_jitter(preset: AugPreset) -> bool:
    return preset.jitter_p > 0 and max(preset.brightness, preset.contrast, preset.saturation, preset.hue) > 0


def _pick(flag, when_set, otherwise):
    """flag * when_set + (1 - flag) * otherwise for a 0/1 float flag: exactly one of the two."""
    return when_set * flag + otherwise * (1.0 - flag)


def colour_every_view(images, preset: AugPreset, device: str):
    """The colour stage as one brightness/contrast pass and one 3x3 matrix pass over every view,
    the factors being exactly 1 (identity matrix) on views that draw no jitter and the matrix the
    grey projection on grey views: the same views as ``colour_branches`` with fewer operators."""
    out = images
    mat = None
    if _has_jitter(preset):
        apply = fn.cast(_coin(preset.jitter_p), dtype=types.FLOAT)
        if preset.brightness > 0 or preset.contrast > 0:
            b = fn.random.uniform(range=[max(0.0, 1.0 - preset.brightness), 1.0 + preset.brightness])
            c = fn.random.uniform(range=[max(0.0, 1.0 - preset.contrast), 1.0 + preset.contrast])
            out = brightness_contrast(out, _pick(apply, b, 1.0), _pick(apply, c, 1.0), device)
        if preset.saturation > 0 or preset.hue > 0:
            sat, theta = draw_chroma(preset)
            mat = (apply, sat, theta)
    if preset.grayscale_p > 0:
        grey = fn.cast(_coin(preset.grayscale_p), dtype=types.FLOAT)
        if mat is None:
            m = _pick(grey, types.Constant(_chroma_matrices(True)[0]), types.Constant(_EYE))
        else:
            apply, sat, theta = mat
            coloured = _pick(apply, chroma_matrix(sat, theta, False), types.Constant(_EYE))
            greyed = _pick(apply, chroma_matrix(sat, theta, True), types.Constant(_chroma_matrices(True)[0]))
            m = _pick(grey, greyed, coloured)
    elif mat is not None:
        apply, sat, theta = mat
        m = _pick(apply, chroma_matrix(sat, theta, False), types.Constant(_EYE))
    else:
        return out
    return fn.coord_transform(out, M=m, dtype=types.UINT8)


def colour(images, preset: AugPreset, device: str, branches: bool = True):
    """Colour jitter (with p=jitter_p) then grayscale (p=grayscale_p), torchvision semantics.

    With ``branches`` DALI conditionals route each view only through the operators it draws, so
    the per-pixel passes run on the views that need them: jitter on ~jitter_p of them, grey on
    ~grayscale_p (folded into the jitter's colour matrix when both apply); otherwise
    ``colour_every_view``. Grey views are exactly grey either way.
    """
    if not branches:
        return colour_every_view(images, preset, device)
    has_jitter = _has_jitter(preset)
    if not has_jitter and preset.grayscale_p <= 0:
        return images
    # Both draws happen for every sample, whatever branch it takes, so the random streams do
    # not depend on earlier outcomes.
    apply = _coin(preset.jitter_p) if has_jitter else None
    grey = _coin(preset.grayscale_p) if preset.grayscale_p > 0 else None
    if apply is None:
        if grey:
            images = to_grey(images)
        return images
    if grey is None:
        if apply:
            images = jitter(images, preset, device)
        return images
    if apply:
        if grey:
            images = jitter(images, preset, device, grey=True)
        else:
            images = jitter(images, preset, device)
    elif grey:
        images = to_grey(images)
    return images


def gaussian_taps(sigma, max_sigma: float):
    """Per-sample normalised 1-D Gaussian weights over a fixed 2 * ceil(3 * max_sigma) + 1 window,
    zero outside +-ceil(3 * sigma): the kernel of size 2 * ceil(3 * sigma) + 1 the reference and
    DALI's ``gaussian_blur`` use, padded to one length for the whole batch."""
    half = int(np.ceil(3.0 * max_sigma))
    offsets = types.Constant(np.arange(-half, half + 1, dtype=np.float32))
    inside = fn.cast(dmath.abs(offsets) <= dmath.ceil(3.0 * sigma), dtype=types.FLOAT)
    weights = dmath.exp(offsets * offsets * (-0.5 / (sigma * sigma))) * inside
    return weights / fn.reductions.sum(weights), 2 * half + 1


def separable_blur(images, sigma, max_sigma: float):
    """Gaussian blur as a row then a column pass of DALI's generic filter with reflect-101
    borders (what torchvision pads with); the row pass stays float, so one rounding at the end.
    On the CPU this is ~3x faster than ``fn.gaussian_blur``, which recomputes its windows."""
    taps, n = gaussian_taps(sigma, max_sigma)
    rows = fn.filter(images, fn.reshape(taps, shape=[1, n]), border="reflect_101", dtype=types.FLOAT)
    cols = fn.filter(rows, fn.reshape(taps, shape=[n, 1]), border="reflect_101", dtype=types.FLOAT)
    return fn.cast(cols, dtype=types.UINT8)


def blur(images, preset: AugPreset, device: str = "cpu"):
    """Gaussian blur with sigma ~ U(blur_sigma), applied with probability blur_p.

    A DALI conditional routes only the chosen samples through the convolution, whose window is
    2 * ceil(3 * sigma) + 1. The GPU keeps DALI's ``gaussian_blur`` (cheap there).
    """
    if preset.blur_p <= 0:
        return images
    if _coin(preset.blur_p):
        sigma = fn.random.uniform(range=list(preset.blur_sigma))
        if device == "cpu":
            images = separable_blur(images, sigma, preset.blur_sigma[1])
        else:
            images = fn.gaussian_blur(images, sigma=sigma)
    return images


def rand_augment(images, preset: AugPreset, size: int):
    """RandAugment(n, m) with torchvision's conventions (black fill, 150/331 max translation)."""
    if preset.randaugment_n <= 0:
        return images
    # DALI's own suite still calls its deprecated fn.experimental aliases (and forces those
    # warnings on); recording them keeps the log clean, there is nothing for a user to act on.
    with warnings.catch_warnings(record=True):
        return dali_rand_augment.rand_augment(
            images,
            n=preset.randaugment_n,
            m=preset.randaugment_m,
            num_magnitude_bins=preset.randaugment_bins,
            shape=(size, size),
            max_translate_rel=RANDAUG_MAX_TRANSLATE_REL,
            fill_value=0,
        )


def check_jigsaw(size: int, grid: int) -> None:
    if grid > 0 and size % grid != 0:
        raise ValueError(
            f"image size {size} is not divisible by the jigsaw grid {grid}: pick image_size a "
            f"multiple of {grid} (e.g. {grid * max(1, round(size / grid))}) or set jigsaw_grid=0"
        )


def jigsaw(images, grid: int, size: int):
    """Cut each size x size image into grid x grid tiles and paste them back in a uniformly random
    order, drawn independently per sample.

    The permutation is the rank of grid*grid random keys; key = random * n + position is never
    tied, so the ranks always form a permutation. ``multi_paste`` with the image given once per
    tile pastes tile t of sample i into sample i at its permuted place (one pass over pixels).
    """
    check_jigsaw(size, grid)
    n = grid * grid
    tile = size // grid
    keys = fn.random.uniform(range=[0, 1 << 20], shape=[n], dtype=types.INT32) * n + types.Constant(
        np.arange(n, dtype=np.int32)
    )
    # rank[i] = number of keys smaller than key[i]
    smaller = fn.reshape(keys, shape=[1, n]) < fn.reshape(keys, shape=[n, 1])
    rank = fn.reductions.sum(fn.cast(smaller, dtype=types.INT32), axes=[1])
    out_anchors = fn.cast(fn.stack((rank // grid) * tile, (rank % grid) * tile, axis=1), dtype=types.INT32)
    positions = np.stack(np.divmod(np.arange(n), grid), axis=1).astype(np.int32) * tile
    return fn.multi_paste(
        *([images] * n),
        in_anchors=types.Constant(positions),
        out_anchors=out_anchors,
        shapes=types.Constant(np.full((n, 2), tile, dtype=np.int32)),
    )


def finish(images, flip_p: float):
    """Horizontal flip with probability flip_p fused with the HWC -> CHW transpose (uint8 out).

    Applied last rather than right after the crop: every stage in between is either pointwise,
    mirror-symmetric (blur kernel, RandAugment's signed magnitudes) or a uniform permutation of
    a symmetric grid (jigsaw), so flipping last yields the same distribution of views.
    """
    mirror = fn.random.coin_flip(probability=flip_p) if flip_p > 0 else 0
    return fn.crop_mirror_normalize(images, mirror=mirror, output_layout="CHW", dtype=types.UINT8)
