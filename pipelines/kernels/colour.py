"""The colour stage of a view (jitter, then grey) as one CPU kernel.

DALI's CPU operators that mix colour channels per pixel (``coord_transform``, ``color_twist``,
``hsv``) are the largest share of a CPU view; this kernel does the whole colour stage of one view
in one pass over its pixels: the jitter draw, brightness, contrast around the view's mean grey,
saturation, hue, and the grayscale conversion.

Colour semantics (same as ``pipelines.dali_ops.colour``): with probability jitter_p a view gets
brightness b, contrast c (around its mean ITU-R 601 grey), saturation s (a blend with the luma
grey) and a hue rotation by theta about the grey diagonal, in that fixed order, each factor drawn
uniformly from its preset range; then with probability grayscale_p the view becomes its luma.
All steps are linear, so they are one affine map per view, rounded and saturated once.
"""

from __future__ import annotations

import numpy as np

from pipelines.kernels import numba_op, run_kernel
from pipelines.kernels.colour_maths import chroma_matrices
from pipelines.kernels.common import copy_image, jit

# Layout of the per-preset constant vector handed to the kernel (see ``colour_constants``).
_P_JITTER, _B_LO, _B_HI, _C_LO, _C_HI, _S_LO, _S_HI, _H_MAX, _P_GREY = range(9)
_MATS = 9  # C0, C1, C2, C3 (chroma basis) and G (grey projection), 9 floats each, row-major
N_DRAWS = 6  # uniform [0, 1) draws per view: apply, b, c, s, hue, grey


def colour_constants(preset) -> np.ndarray:
    """The constants of one preset: probabilities, factor ranges and the chroma basis."""
    c0, c1, c2, c3 = chroma_matrices(False)
    grey = chroma_matrices(True)[0]  # 1 l^T: every channel becomes the luma
    scalars = [
        preset.jitter_p,
        max(0.0, 1.0 - preset.brightness), 1.0 + preset.brightness,
        max(0.0, 1.0 - preset.contrast), 1.0 + preset.contrast,
        max(0.0, 1.0 - preset.saturation), 1.0 + preset.saturation,
        2.0 * np.pi * preset.hue,
        preset.grayscale_p,
    ]  # fmt: skip
    return np.concatenate([np.float32(scalars), *(np.float32(m).ravel() for m in (c0, c1, c2, c3, grey))])


@jit
def colour_run(out, img, draws, consts):
    """One view: ``out`` (H, W, 3) uint8 = the colour stage applied to ``img`` (H, W, 3) uint8.

    ``draws``: N_DRAWS uniforms in [0, 1) for this view; ``consts``: ``colour_constants``.
    """
    h, w, _ = img.shape
    n = h * w
    src = img.reshape(n * 3)
    dst = out.reshape(n * 3)
    m = np.zeros(9, dtype=np.float32)
    m[0] = m[4] = m[8] = 1.0
    b = np.float32(1.0)
    c = np.float32(1.0)
    base = 9
    if draws[0] < consts[_P_JITTER]:
        b = np.float32(consts[_B_LO] + draws[1] * (consts[_B_HI] - consts[_B_LO]))
        c = np.float32(consts[_C_LO] + draws[2] * (consts[_C_HI] - consts[_C_LO]))
        s = consts[_S_LO] + draws[3] * (consts[_S_HI] - consts[_S_LO])
        theta = (2.0 * draws[4] - 1.0) * consts[_H_MAX]
        sc = s * np.cos(theta)
        ss = s * np.sin(theta)
        for i in range(9):
            m[i] = consts[base + i] + s * consts[base + 9 + i] + sc * consts[base + 18 + i] + ss * consts[base + 27 + i]
    if draws[5] < consts[_P_GREY]:
        g = consts[base + 36 : base + 45]
        grey = np.zeros(9, dtype=np.float32)
        for r in range(3):
            for col in range(3):
                grey[3 * r + col] = g[3 * r] * m[col] + g[3 * r + 1] * m[3 + col] + g[3 * r + 2] * m[6 + col]
        m = grey
    identity = b == 1.0 and c == 1.0
    for i in range(9):
        if m[i] != (1.0 if i % 4 == 0 else 0.0):
            identity = False
    if identity:
        copy_image(out, img)
        return
    # brightness b then contrast c around the mean grey of the brightened view (b * mean, as
    # torchvision computes it on the brightened image): x -> b c x + b (1 - c) mean
    t = np.float32(0.0)
    if c != 1.0:
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            s0 += src[3 * i]
            s1 += src[3 * i + 1]
            s2 += src[3 * i + 2]
        mean = (0.299 * s0 + 0.587 * s1 + 0.114 * s2) / n
        t = np.float32(b * (1.0 - c) * mean)
    k = b * c
    a00 = np.float32(k * m[0])
    a01 = np.float32(k * m[1])
    a02 = np.float32(k * m[2])
    a10 = np.float32(k * m[3])
    a11 = np.float32(k * m[4])
    a12 = np.float32(k * m[5])
    a20 = np.float32(k * m[6])
    a21 = np.float32(k * m[7])
    a22 = np.float32(k * m[8])
    lo = np.float32(0.0)
    hi = np.float32(255.0)
    half = np.float32(0.5)
    for i in range(n):
        r = np.float32(src[3 * i])
        gg = np.float32(src[3 * i + 1])
        bb = np.float32(src[3 * i + 2])
        # round half up after saturating to [0, 255]: the uint8 conversion truncates
        dst[3 * i] = np.uint8(min(max(a00 * r + a01 * gg + a02 * bb + t, lo), hi) + half)
        dst[3 * i + 1] = np.uint8(min(max(a10 * r + a11 * gg + a12 * bb + t, lo), hi) + half)
        dst[3 * i + 2] = np.uint8(min(max(a20 * r + a21 * gg + a22 * bb + t, lo), hi) + half)




def _entry(out, img, draws, consts):  # compiled by DALI in every process; one call into the cache
    colour_run(out, img, draws, consts)


def stage(images, preset):
    """The colour stage of every view as this kernel: one pass over the pixels of the views that
    draw a change, a copy for the others. Same distribution as ``pipelines.dali_ops.colour``."""
    if not (preset.jitter_p > 0 and max(preset.brightness, preset.contrast, preset.saturation, preset.hue) > 0) \
            and preset.grayscale_p <= 0:
        return images
    return run_kernel(numba_op("colour", _entry), images, N_DRAWS, colour_constants(preset))
