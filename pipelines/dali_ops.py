"""The augmentation stages of a view as DALI operators: the GPU pipeline's stages, and the CPU
pipeline's where the Numba kernels (``pipelines.kernels``) are not used.

Each stage is a pure function of a batch of uint8 HWC views (DataNodes) and the preset; every
operator runs where its input lives, and per-sample random parameters (drawn on the CPU, where
DALI draws them) are moved next to the image when needed.
"""

from __future__ import annotations

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, types

from pipelines.kernels.colour import factor_ranges, has_colour
from pipelines.kernels.colour_maths import GREY_WEIGHTS
from pipelines.kernels.crop import draw_window
from pipelines.presets import JIGSAW_LOCAL_K, AugPreset


def _near(param, device: str):
    """Move a per-sample CPU parameter next to GPU images (arithmetic needs one placement)."""
    return param.gpu() if device == "gpu" else param


def crop(images, preset: AugPreset, size: int):
    """Random resized crop to size x size, or (no randomness) shorter side to resize_ratio*size
    and a centre crop.

    Antialiased linear resampling, as torchvision's RandomResizedCrop on uint8 tensors: without
    it the crop is cheaper but aliases large crops.
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


def crop_flip(images, preset: AugPreset, size: int):
    """The random resized crop and then, with probability flip_p, the horizontal flip, as one
    resampling (the flip costs no pass of its own).

    The window is drawn as ``fn.random_resized_crop`` draws it (``fn.random_crop_generator``: the
    same area and aspect ranges, ten attempts, then the centre fallback) and resized with the same
    antialiased linear filter; a mirrored view reads its window right to left (an ROI whose x start
    lies past its end, which DALI's resize documents as a flip). Equal to ``crop`` then ``flip`` up
    to rounding: one grey level on well under 0.1% of the values (``tests/test_dali.py``).
    """
    anchor, extent = draw_window(images, preset)
    coin = fn.random.coin_flip(probability=preset.flip_p, dtype=types.INT32, shape=[1])
    mirror = coin * types.Constant(np.float32([0.0, 1.0]))  # (y, x): only x is ever reversed
    return fn.resize(
        images,
        size=[size, size],
        roi_start=anchor + extent * mirror,
        roi_end=anchor + extent * (1.0 - mirror),
        roi_relative=False,
        antialias=True,
    )


def _coin(p: float):
    """A per-sample boolean, True with probability p (a predicate for DALI conditionals)."""
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


# The colour stage works on three float32 planes (H, W) holding whole numbers in [0, 255]: every
# operation ends with torchvision's clamp and truncation, so the planes always hold uint8 values.
def _trunc(v):
    return dmath.floor(dmath.clamp(v, 0.0, 255.0))


def grey_plane(r, g, b):
    """torchvision's uint8 grey: trunc(0.2989 R + 0.587 G + 0.114 B)."""
    w0, w1, w2 = (np.float32(w) for w in GREY_WEIGHTS)
    return dmath.floor(r * w0 + g * w1 + b * w2)


def _blend(planes, other, f):
    """torchvision's _blend of each plane with ``other`` (a plane or a per-sample scalar)."""
    return tuple(_trunc(x * f + other * (1.0 - f)) for x in planes)


def _hue(planes, shift):
    """torchvision's adjust_hue: x / 255, RGB -> HSV, h <- (h + shift) mod 1, HSV -> RGB,
    trunc(255.999 y); branch-free (boolean masks select), so each step is one fused element-wise
    expression."""
    r, g, b = (x * np.float32(1.0 / 255.0) for x in planes)
    v = dmath.max(dmath.max(r, g), b)
    span = v - dmath.min(dmath.min(r, g), b)
    flat = span == 0.0  # grey pixels: no hue, no saturation (the divisions below see 1 instead)
    s = span / (v + flat)
    rc, gc, bc = ((v - x) / (span + flat) for x in (r, g, b))
    at_r = v == r
    at_g = (v == g) * (v != r)
    at_b = (v != g) * (v != r)
    h = at_r * (bc - gc) + at_g * ((rc + 2.0) - bc) + at_b * ((gc + 4.0) - rc)
    h = h * np.float32(1.0 / 6.0) + 1.0
    h = h - dmath.floor(h)
    h = h + shift
    h = h - dmath.floor(h)
    h6 = h * 6.0
    sector = dmath.floor(h6)
    f = h6 - sector
    q = dmath.clamp((1.0 - s * f) * v, 0.0, 1.0)
    t = dmath.clamp((s * f + (1.0 - s)) * v, 0.0, 1.0)
    p = dmath.clamp((1.0 - s) * v, 0.0, 1.0)
    e = [sector == float(k) for k in range(6)]
    back = np.float32(255.0 + 1.0 - 1e-3)
    out_r = v * (e[0] | e[5]) + q * e[1] + p * (e[2] | e[3]) + t * e[4]
    out_g = t * e[0] + v * (e[1] | e[2]) + q * e[3] + p * (e[4] | e[5])
    out_b = p * (e[0] | e[1]) + t * e[2] + v * (e[3] | e[4]) + q * e[5]
    return tuple(dmath.floor(x * back) for x in (out_r, out_g, out_b))


def _jitter_op(planes, op, factors):
    """Operation ``op`` (a per-sample 0..3: brightness, contrast, saturation, hue) with its factor;
    a disabled one (factor None) leaves the planes as they are."""
    fb, fc, fs, fh = factors
    if op == 0:
        if fb is not None:
            planes = tuple(_trunc(x * fb) for x in planes)
    elif op == 1:
        if fc is not None:
            mean = fn.reductions.mean(grey_plane(*planes))
            planes = _blend(planes, mean, fc)
    elif op == 2:
        if fs is not None:
            planes = _blend(planes, grey_plane(*planes), fs)
    else:
        if fh is not None:
            planes = _hue(planes, fh)
    return planes


def random_order(n: int):
    """A uniformly random permutation of 0..n-1 per sample, (n,) int32: ``order[j]`` is the
    operation applied j-th (the ranks of n uniform keys, ties broken by position)."""
    keys = fn.random.uniform(range=[0.0, 1.0], shape=[n])
    pos = np.arange(n, dtype=np.int32)
    tie = types.Constant(np.int32(pos[None, :] < pos[:, None]))  # [a, b]: b before a
    a_keys, b_keys = fn.reshape(keys, shape=[n, 1]), fn.reshape(keys, shape=[1, n])
    smaller = fn.cast(b_keys < a_keys, dtype=types.INT32) + fn.cast(b_keys == a_keys, dtype=types.INT32) * tie
    rank = fn.reductions.sum(smaller, axes=[1])  # rank[a]: operations before a
    onehot = fn.cast(fn.reshape(rank, shape=[n, 1]) == types.Constant(pos.reshape(1, n)), dtype=types.INT32)
    return fn.reductions.sum(onehot * types.Constant(pos.reshape(n, 1)), axes=[0])


def colour(images, preset: AugPreset, device: str):
    """Colour jitter (p=jitter_p) then grayscale (p=grayscale_p) with torchvision's semantics (see
    ``pipelines.kernels.colour``): random order per view, clamp and truncation after each
    operation, HSV hue shift. DALI conditionals route each view only through what it draws."""
    if not has_colour(preset):
        return images
    ranges = factor_ranges(preset)
    jitter = preset.jitter_p > 0 and any(on for _, _, on in ranges)
    # every draw happens for every sample, whatever branch it takes, so the random streams do
    # not depend on earlier outcomes
    apply = _coin(preset.jitter_p) if jitter else None
    grey = _coin(preset.grayscale_p) if preset.grayscale_p > 0 else None
    factors = tuple(_near(fn.random.uniform(range=[lo, hi]), device) if on else None for lo, hi, on in ranges)
    order = random_order(4) if jitter else None
    x = fn.cast(images, dtype=types.FLOAT)
    planes = (x[:, :, 0], x[:, :, 1], x[:, :, 2])
    if apply is not None:
        if apply:
            for j in range(4):
                planes = _jitter_op(planes, order[j], factors)
    if grey is not None:
        if grey:
            lum = grey_plane(*planes)
            planes = (lum, lum, lum)
    return fn.cast(fn.stack(*planes, axis=2, axis_name="C"), dtype=types.UINT8)


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
    On the CPU this is cheaper than ``fn.gaussian_blur``, which recomputes its windows."""
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
    """RandAugment(n, m) with torchvision's operations and conventions (``pipelines.dali_randaugment``)."""
    if preset.randaugment_n <= 0:
        return images
    from pipelines.dali_randaugment import rand_augment as torchvision_rand_augment  # it uses this module's maths

    return torchvision_rand_augment(images, preset.randaugment_n, preset.randaugment_m, preset.randaugment_bins, size)


def check_jigsaw(size: int, grid: int) -> None:
    if grid > 0 and size % grid != 0:
        raise ValueError(
            f"image size {size} is not divisible by the jigsaw grid {grid}: pick image_size a "
            f"multiple of {grid} (e.g. {grid * max(1, round(size / grid))}) or set jigsaw_grid=0"
        )


def _ranks(keys, same_group, n: int):
    """rank[a] = number of b in a's group (``same_group[a, b]``) whose key is smaller (ties broken
    by position): the place of each element after sorting its group, (n,) int32."""
    pos = np.arange(n, dtype=np.int32)
    tie = types.Constant(np.int32(pos[None, :] < pos[:, None]))
    a_keys, b_keys = fn.reshape(keys, shape=[n, 1]), fn.reshape(keys, shape=[1, n])
    smaller = fn.cast(b_keys < a_keys, dtype=types.INT32) + fn.cast(b_keys == a_keys, dtype=types.INT32) * tie
    return fn.reductions.sum(smaller * same_group, axes=[1])


def jigsaw_targets(grid: int, mode: str):
    """(n, 2) int32 per sample: the tile (row, column) each source tile moves to.

    'global': the ranks of n uniform keys (a uniform permutation). 'local': DCL's region confusion,
    each row sorted by x + U(-k, k), then each column by y + U(-k, k); the column keys belong to
    the tiles (iid, so the same distribution as keys per intermediate position)."""
    n = grid * grid
    ty, tx = (np.float32(a) for a in np.divmod(np.arange(n), grid))
    if mode == "global":
        rank = _ranks(fn.random.uniform(range=[0.0, 1.0], shape=[n]), types.Constant(np.ones((n, n), np.int32)), n)
        return fn.stack(rank // grid, rank % grid, axis=1)
    k = JIGSAW_LOCAL_K
    row_keys = types.Constant(tx) + fn.random.uniform(range=[-k, k], shape=[n])
    same_row = types.Constant(np.int32(ty[:, None] == ty[None, :]))
    new_x = _ranks(row_keys, same_row, n)
    col_keys = types.Constant(ty) + fn.random.uniform(range=[-k, k], shape=[n])
    same_col = fn.cast(fn.reshape(new_x, shape=[n, 1]) == fn.reshape(new_x, shape=[1, n]), dtype=types.INT32)
    new_y = _ranks(col_keys, same_col, n)
    return fn.stack(new_y, new_x, axis=1)


def jigsaw(images, preset: AugPreset, size: int):
    """With probability jigsaw_p, cut each size x size image into grid x grid tiles and move them
    (``jigsaw_targets``), drawn independently per sample.

    ``multi_paste`` with the image given once per tile pastes tile t of sample i into sample i at
    its new place (one pass over pixels).
    """
    grid = preset.jigsaw_grid
    check_jigsaw(size, grid)
    n = grid * grid
    tile = size // grid
    apply = _coin(preset.jigsaw_p) if preset.jigsaw_p < 1 else None
    out_anchors = fn.cast(jigsaw_targets(grid, preset.jigsaw_mode) * tile, dtype=types.INT32)
    positions = np.stack(np.divmod(np.arange(n), grid), axis=1).astype(np.int32) * tile
    shapes = types.Constant(np.full((n, 2), tile, dtype=np.int32))
    if apply is None:
        return fn.multi_paste(*([images] * n), in_anchors=types.Constant(positions), out_anchors=out_anchors,
                              shapes=shapes)  # fmt: skip
    if apply:
        images = fn.multi_paste(*([images] * n), in_anchors=types.Constant(positions), out_anchors=out_anchors,
                                shapes=shapes)  # fmt: skip
    return images


def flip(images, flip_p: float):
    """Horizontal flip with probability flip_p, drawn per sample."""
    return fn.flip(images, horizontal=fn.random.coin_flip(probability=flip_p, dtype=types.INT32))


def to_chw(images):
    """HWC -> CHW, the layout the views leave the pipeline in (uint8)."""
    return fn.transpose(images, perm=[2, 0, 1], output_layout="CHW")
