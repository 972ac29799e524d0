"""RandAugment from DALI operators with torchvision's semantics: the GPU pipeline's RandAugment.

torchvision's ``transforms.v2.RandAugment`` (nearest interpolation, black fill) is what the CPU
kernel (``pipelines.kernels.randaugment``) computes per view; this module builds the same 14
operations from DALI operators, so the GPU graph and the CPU kernels draw the same views. DALI's
own suite (``nvidia.dali.auto_aug.rand_augment``) differs from torchvision in the interpolation
(linear), the translation (fractional, not truncated to whole pixels), the solarize threshold
(a 256 scale), sharpness (rounding and borders), the colour arithmetic and the magnitude tables.

DALI's ``apply_rand_augment`` does the drawing (operation uniformly, sign with probability 1/2);
every operation here is given its parameter for the preset's magnitude bin, computed on the host
at definition time from torchvision's float32 magnitude tables. Geometric operations are warps
by torchvision's inverse affine matrix; colour operations use the colour stage's exact uint8
arithmetic (``pipelines.dali_ops``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import rand_augment as dali_rand_augment
from nvidia.dali.auto_aug.core import augmentation
from nvidia.dali.pipeline import do_not_convert

from pipelines.kernels.randaugment import MAX_TRANSLATE_REL, inverse_affine, tv_linspace

SHARPEN = np.float32([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / np.float32(13.0)


def magnitudes(lo: float, hi: float, bins: int) -> np.ndarray:
    """torch.linspace(lo, hi, bins) in float32, bit for bit (the CPU kernel's table)."""
    return np.float32([tv_linspace.py_func(lo, hi, bins, i) for i in range(bins)])


def warp_matrix(size: int, angle=0.0, tx=0.0, ty=0.0, shear_x=0.0, shear_y=0.0, corner=False) -> np.ndarray:
    """DALI's destination -> source matrix (2 x 3, pixel corners at integers) for torchvision's
    affine about the image centre, or about the top-left corner (``corner``: the shears)."""
    c = -0.5 * size if corner else 0.0
    m = inverse_affine.py_func(angle, tx, ty, shear_x, shear_y, c, c)
    a = np.float64([[m[0], m[1]], [m[3], m[4]]])
    t = np.float64([m[2], m[5]])
    half = np.full(2, 0.5 * size)  # torchvision's coordinates are relative to the image centre
    return np.float32(np.concatenate([a, (t + half - a @ half)[:, None]], axis=1))


def _warp(data, matrix):
    return fn.warp_affine(data, matrix=matrix, inverse_map=True, fill_value=0, interp_type=types.INTERP_NN)


def _planes(data):
    x = fn.cast(data, dtype=types.FLOAT)
    return x[:, :, 0], x[:, :, 1], x[:, :, 2]


def _stack(planes):
    return fn.cast(fn.stack(*planes, axis=2, axis_name="C"), dtype=types.UINT8)


def _constant(array: np.ndarray, like):
    """``array`` as a DALI constant on the device of ``like`` (a DataNode)."""
    return types.Constant(array, device="gpu") if like.device == "gpu" else types.Constant(array)


@do_not_convert  # definition-time Python only (no per-sample branches), lambdas included
def torchvision_suite(m: int, bins: int, size: int) -> list:
    """The 14 operations of torchvision's RandAugment at magnitude bin ``m`` of ``bins`` for
    size x size views, in torchvision's order."""
    from pipelines.dali_ops import _blend, _trunc, grey_plane

    def warp_op(name, to_matrix, mags):
        def op(data, matrix):
            return _warp(data, matrix)

        return augmentation(op, mag_range=mags, randomly_negate=True, mag_to_param=to_matrix, name=name)

    def degrees_of_shear(v):
        return math.degrees(math.atan(v))

    shear = magnitudes(0.0, 0.3, bins)
    shift = magnitudes(0.0, MAX_TRANSLATE_REL * size, bins)
    # brightness, color and contrast: PIL's enhance factor 1 + v, v signed
    enhancement = augmentation(
        mag_range=magnitudes(0.0, 0.9, bins),
        randomly_negate=True,
        mag_to_param=lambda v: np.float32(1.0 + v),
        param_device="auto",
    )

    @enhancement
    def brightness(data, factor):
        return _stack(tuple(_trunc(x * factor) for x in _planes(data)))

    @enhancement
    def color(data, factor):
        planes = _planes(data)
        return _stack(_blend(planes, grey_plane(*planes), factor))

    @enhancement
    def contrast(data, factor):
        planes = _planes(data)
        return _stack(_blend(planes, fn.reductions.mean(grey_plane(*planes)), factor))

    interior = np.zeros((size, size, 1), dtype=np.float32)
    interior[1:-1, 1:-1] = 1.0

    @augmentation(mag_range=magnitudes(0.0, 0.9, bins), randomly_negate=True,
                  mag_to_param=lambda v: np.float32(1.0 - (1.0 + v)), param_device="auto")  # fmt: skip
    def sharpness(data, keep):
        """Blend with the rounded 3x3 smoothing inside the border (``keep`` = 1 - factor)."""
        x = fn.cast(data, dtype=types.FLOAT)
        smooth = dmath.floor(fn.experimental.filter(x, types.Constant(SHARPEN), dtype=types.FLOAT) + 0.5)
        inside = _constant(interior, data)
        smooth = smooth * inside + x * (1.0 - inside)
        return fn.cast(dmath.floor(dmath.clamp(x + keep * (smooth - x), 0.0, 255.0)), dtype=types.UINT8)

    def posterize_mask(b):
        bits = int(np.rint(8.0 - b / ((bins - 1.0) / 4.0)))
        return np.uint8((((1 << bits) - 1) << (8 - bits)) & 255)

    @augmentation(mag_range=np.float32(np.arange(bins)), mag_to_param=posterize_mask, param_device="auto")
    def posterize(data, mask):
        return data & mask

    @augmentation(mag_range=magnitudes(1.0, 0.0, bins), mag_to_param=lambda v: np.float32(255.0 * v),
                  param_device="auto")  # fmt: skip
    def solarize(data, threshold):
        flip = data >= threshold
        return flip * (types.Constant(255, dtype=types.UINT8) - data) + (flip ^ True) * data

    @augmentation
    def auto_contrast(data, _=None):
        x = fn.cast(data, dtype=types.FLOAT)
        lo = fn.reductions.min(x, axis_names="HW", keep_dims=True)
        hi = fn.reductions.max(x, axis_names="HW", keep_dims=True)
        flat = hi == lo
        inv_scale = (hi - lo) * np.float32(1.0 / 255.0) + flat
        y = (x - lo * (flat ^ True)) / inv_scale
        return fn.cast(dmath.floor(dmath.clamp(y, 0.0, 255.0)), dtype=types.UINT8)

    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 1, 256)

    @augmentation
    def equalize(data, _=None):
        """PIL's (torchvision's) equalisation per channel: ``step`` = (pixels - count of the top
        level) // 255, level v -> min(255, (pixels below v + step // 2) // step), unchanged if
        step is 0. DALI's own equalize rounds OpenCV's way, far from this on small images.
        Counts come from comparisons with all 256 levels (no histogram operator in DALI)."""
        lv = _constant(levels, data)
        x = fn.expand_dims(data, axes=[3])  # (H, W, C, 1)
        below = fn.reductions.sum(fn.cast(x < lv, dtype=types.INT32), axes=[0, 1], keep_dims=True)  # (1,1,C,256)
        top = fn.reductions.max(data, axis_names="HW", keep_dims=True)  # (1, 1, C)
        pixels = size * size
        at_top = fn.reductions.sum(fn.cast(data == top, dtype=types.INT32), axis_names="HW", keep_dims=True)
        step = (pixels - at_top) // 255  # (1, 1, C)
        flat = step == 0
        step4 = fn.expand_dims(step + flat, axes=[3])
        lut = dmath.min((below + step4 // 2) // step4, 255)  # (1, 1, C, 256)
        mapped = fn.reductions.sum(fn.cast(x == lv, dtype=types.INT32) * lut, axes=[3])  # (H, W, C)
        keep = fn.cast(flat, dtype=types.INT32)
        return fn.cast(mapped * (1 - keep) + fn.cast(data, dtype=types.INT32) * keep, dtype=types.UINT8)

    @augmentation
    def identity(data, _=None):
        return data

    return [
        identity,
        warp_op("shear_x", lambda v: warp_matrix(size, shear_x=degrees_of_shear(v), corner=True), shear),
        warp_op("shear_y", lambda v: warp_matrix(size, shear_y=degrees_of_shear(v), corner=True), shear),
        warp_op("translate_x", lambda v: warp_matrix(size, tx=float(int(v))), shift),
        warp_op("translate_y", lambda v: warp_matrix(size, ty=float(int(v))), shift),
        warp_op("rotate", lambda v: warp_matrix(size, angle=-float(v)), magnitudes(0.0, 30.0, bins)),
        brightness,
        color,
        contrast,
        sharpness,
        posterize,
        solarize,
        auto_contrast,
        equalize,
    ]


def rand_augment(images, n: int, m: int, bins: int, size: int, only: tuple[int, ...] | None = None):
    """RandAugment(n, m) over size x size uint8 HWC views; ``only`` keeps a subset of the 14
    operations (indices in torchvision's order; for tests that look at one operation)."""
    suite = torchvision_suite(m, bins, size)
    if only is not None:
        suite = [suite[i] for i in only]
    # DALI's auto_aug calls its deprecated fn.experimental aliases and forces those warnings on
    with warnings.catch_warnings(record=True):
        return dali_rand_augment.apply_rand_augment(suite, images, n=n, m=m, num_magnitude_bins=bins)
