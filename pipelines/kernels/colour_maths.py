"""Colour maths shared by the CPU kernels: torchvision's uint8 colour operations on one HWC view.

Each function follows ``torchvision.transforms.v2.functional`` on uint8 tensors step by step, in
float32 (the precision torchvision computes in), with its clamp and its truncation back to uint8
after every operation: ``blend_to`` (brightness, contrast and saturation are blends with black,
the mean grey and the pixel's grey; ``saturate_to`` is the last in one pass, each pixel's grey
taken where it is blended), ``grey_to`` (rgb_to_grayscale) and ``hue_shift_to`` (adjust_hue:
RGB -> HSV, shift the hue, HSV -> RGB). Faster forms (a 256-entry table, one pass, no branches)
keep the same arithmetic, so the same bits. The per-value functions (``blend_value``, ``grey_value``, ``hue_pixel``) are
twins (``kernels.twin``): the CUDA kernels (``kernels.cuda``) compile the same source.
"""

from __future__ import annotations

import numpy as np

from pipelines.kernels.common import jit
from pipelines.kernels.twin import fmul, twin

# torchvision's grey (rgb_to_grayscale, and the grey its contrast and saturation blend with).
GREY_WEIGHTS = (0.2989, 0.587, 0.114)


@twin
def blend_value(x, r, q, o):
    """One channel value of ``blend_to``; torch's add_(other, alpha) is a fused multiply-add: one
    rounding of x r + q o."""
    v = np.float32(np.float64(np.float32(x) * r) + np.float64(q) * np.float64(o))
    return np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


@jit
def blend_to(dst, src, other, ratio):
    """torchvision's _blend on uint8: trunc(clamp(src * ratio + other * (1 - ratio), 0, 255)),
    ``other`` a float32 array broadcast per pixel (H, W) or a scalar array of shape (1, 1).
    With a scalar ``other`` every output value depends on the input value alone, so the 256
    results are computed once and looked up (the same arithmetic, so the same bits)."""
    blend_rq_to(dst, src, other, np.float32(ratio), np.float32(1.0 - ratio))


@jit
def blend_rq_to(dst, src, other, r, q):
    """``blend_to`` with its two float32 factors given: ``r`` = ratio, ``q`` = 1 - ratio (each
    rounded from the float64 ratio)."""
    h, w, ch = src.shape
    if other.shape[0] != h or other.shape[1] != w:
        blend_const_to(dst, src, other[0, 0], r, q)
        return
    for i in range(h):
        for j in range(w):
            o = other[i, j]
            for c in range(ch):
                dst[i, j, c] = blend_value(src[i, j, c], r, q, o)


@jit
def blend_const_to(dst, src, o, r, q):
    """``blend_rq_to`` with one float32 ``other`` value ``o`` for every pixel: each output value
    depends on the input value alone, so the 256 results are computed once and looked up."""
    table = np.empty(256, dtype=np.uint8)
    for x in range(256):
        table[x] = blend_value(x, r, q, o)
    n = src.size
    d = dst.reshape(n)
    s = src.reshape(n)
    for i in range(n):
        d[i] = table[s[i]]


@twin
def grey_value(r, g, b):
    """floor(0.2989 R + 0.587 G + 0.114 B) of one pixel, float32 (torchvision's uint8 grey).
    torchvision adds G and B with ``add_(x, alpha=w)``, a fused multiply-add (one rounding): the
    sum is formed in float64, where the product of a uint8 and a float32 weight plus the float32
    partial sum is exact, then rounded once to float32."""
    v = np.float32(r) * np.float32(0.2989)
    v = np.float32(np.float64(g) * np.float64(np.float32(0.587)) + np.float64(v))
    v = np.float32(np.float64(b) * np.float64(np.float32(0.114)) + np.float64(v))
    return np.floor(v)


@jit
def grey_to(dst, src):
    """torchvision's rgb_to_grayscale(num_output_channels=3) on uint8: the truncated grey in R, G, B."""
    n = src.shape[0] * src.shape[1]
    s3 = src.reshape(n * 3)
    d3 = dst.reshape(n * 3)
    for px in range(n):
        v = np.uint8(grey_value(s3[3 * px], s3[3 * px + 1], s3[3 * px + 2]))
        d3[3 * px] = v
        d3[3 * px + 1] = v
        d3[3 * px + 2] = v


@jit
def saturate_to(dst, src, ratio):
    """torchvision's adjust_saturation on uint8: ``blend_to`` with each pixel's grey
    (``grey_value``) in one pass, the grey taken before the pixel is written."""
    saturate_rq_to(dst, src, np.float32(ratio), np.float32(1.0 - ratio))


@jit
def saturate_rq_to(dst, src, r, q):
    """``saturate_to`` with its two float32 factors given (``blend_rq_to``'s ``r``, ``q``): no grey
    plane, each pixel's grey computed where it is blended."""
    n = src.shape[0] * src.shape[1]
    s3 = src.reshape(n * 3)
    d3 = dst.reshape(n * 3)
    for px in range(n):
        a = s3[3 * px]
        b = s3[3 * px + 1]
        c = s3[3 * px + 2]
        o = grey_value(a, b, c)
        d3[3 * px] = blend_value(a, r, q, o)
        d3[3 * px + 1] = blend_value(b, r, q, o)
        d3[3 * px + 2] = blend_value(c, r, q, o)


@jit
def mean_grey(src):
    """The mean of the truncated grey (torchvision's contrast centre), as a (1, 1) float32 array.
    The greys are whole numbers, so their sum is exact in a 64-bit integer."""
    out = np.zeros((1, 1), dtype=np.float32)
    out[0, 0] = mean_grey_value(src)
    return out


@jit
def mean_grey_value(src):
    """``mean_grey`` as a float32 scalar."""
    n = src.shape[0] * src.shape[1]
    s3 = src.reshape(n * 3)
    total = 0
    for px in range(n):
        total += np.int64(grey_value(s3[3 * px], s3[3 * px + 1], s3[3 * px + 2]))
    return np.float32(total / n)


@twin
def hue_pixel(r8, g8, b8, shift):
    """torchvision's adjust_hue of one uint8 pixel: x / 255, RGB -> HSV, h <- (h + shift) mod 1,
    HSV -> RGB, then trunc(255.999 y); ``shift`` (float32) in [-0.5, 0.5], a fraction of the
    colour circle. The same float32 operations as torchvision's ``_rgb_to_hsv`` / ``_hsv_to_rgb``,
    written without branches (selects), as torchvision's tensor code is. Divisors are maxc or the
    channel range where they are not 0, else 1."""
    inv255 = np.float32(1.0 / 255.0)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    sixth = np.float32(1.0 / 6.0)
    six = np.float32(6.0)
    back = np.float32(255.0 + 1.0 - 1e-3)
    r = np.float32(r8) * inv255
    g = np.float32(g8) * inv255
    b = np.float32(b8) * inv255
    maxc = max(r, max(g, b))
    minc = min(r, min(g, b))
    rng = maxc - minc
    grey = rng == zero  # no hue, no saturation: torchvision divides by 1 and gets h = 0
    s = rng / (one if grey else maxc)
    div = one if grey else rng
    rc = (maxc - r) / div
    gc = (maxc - g) / div
    bc = (maxc - b) / div
    is_r = maxc == r
    is_g = maxc == g
    hh = (bc - gc) if is_r else (((rc + np.float32(2.0)) - bc) if is_g else ((gc + np.float32(4.0)) - rc))
    hh = fmul(hh, sixth) + one
    hh = hh - np.floor(hh)  # fmod(., 1) of a positive number
    hh = hh + shift
    hh = hh - np.floor(hh)  # remainder(., 1): in [0, 1)
    h6 = fmul(hh, six)
    k = np.floor(h6)
    f = h6 - k
    sf = fmul(s, f)
    q = min(max((one - sf) * maxc, zero), one)
    t = min(max((sf + (one - s)) * maxc, zero), one)
    p = min(max((one - s) * maxc, zero), one)
    sector = int(k)
    sector = 0 if sector >= 6 else sector
    # torchvision's table: sector -> (R, G, B) from (v, t, p), (q, v, p), (p, v, t), (p, q, v),
    # (t, p, v), (v, p, q)
    ro = maxc if (sector == 0 or sector == 5) else (q if sector == 1 else (t if sector == 4 else p))
    go = t if sector == 0 else (maxc if (sector == 1 or sector == 2) else (q if sector == 3 else p))
    bo = p if sector <= 1 else (t if sector == 2 else (maxc if sector <= 4 else q))
    return np.uint8(ro * back), np.uint8(go * back), np.uint8(bo * back)


@jit
def hue_shift_to(dst, src, hue):
    """torchvision's adjust_hue on uint8 (``hue_pixel`` of every pixel); ``hue`` in [-0.5, 0.5]."""
    shift = np.float32(hue)
    n = src.shape[0] * src.shape[1]
    s3 = src.reshape(n * 3)
    d3 = dst.reshape(n * 3)
    for px in range(n):
        r, g, b = hue_pixel(s3[3 * px], s3[3 * px + 1], s3[3 * px + 2], shift)
        d3[3 * px] = r
        d3[3 * px + 1] = g
        d3[3 * px + 2] = b
