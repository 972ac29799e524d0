"""Colour maths shared by the CPU kernels: torchvision's uint8 colour operations on one HWC view.

Each function follows ``torchvision.transforms.v2.functional`` on uint8 tensors step by step, in
float32 (the precision torchvision computes in), with its clamp and its truncation back to uint8
after every operation: ``blend_to`` (brightness, contrast and saturation are blends with black,
the mean grey and the pixel's grey), ``grey_floor`` / ``grey_to`` (rgb_to_grayscale) and
``hue_shift_to`` (adjust_hue: RGB -> HSV, shift the hue, HSV -> RGB).
"""

from __future__ import annotations

import numpy as np

from pipelines.kernels.common import jit

# torchvision's grey (rgb_to_grayscale, and the grey its contrast and saturation blend with).
GREY_WEIGHTS = (0.2989, 0.587, 0.114)


@jit
def blend_to(dst, src, other, ratio):
    """torchvision's _blend on uint8: trunc(clamp(src * ratio + other * (1 - ratio), 0, 255)),
    ``other`` a float32 array broadcast per pixel (H, W) or a scalar array of shape (1, 1)."""
    h, w, ch = src.shape
    r = np.float32(ratio)
    q = np.float32(1.0 - ratio)
    per_pixel = other.shape[0] == h
    for i in range(h):
        for j in range(w):
            o = other[i, j] if per_pixel else other[0, 0]
            for c in range(ch):
                # torch's add_(other, alpha) is a fused multiply-add: one rounding of x r + q o
                v = np.float32(np.float64(np.float32(src[i, j, c]) * r) + np.float64(q) * np.float64(o))
                dst[i, j, c] = np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


@jit
def grey_floor(src):
    """floor(0.2989 R + 0.587 G + 0.114 B) per pixel, float32 (torchvision's uint8 grey for blends)."""
    h, w, _ = src.shape
    out = np.empty((h, w), dtype=np.float32)
    for i in range(h):
        for j in range(w):
            v = np.float32(src[i, j, 0]) * np.float32(0.2989)
            v = v + np.float32(src[i, j, 1]) * np.float32(0.587)
            v = v + np.float32(src[i, j, 2]) * np.float32(0.114)
            out[i, j] = np.floor(v)
    return out


@jit
def grey_to(dst, src):
    """torchvision's rgb_to_grayscale(num_output_channels=3) on uint8: the truncated grey in R, G, B."""
    g = grey_floor(src)
    h, w, _ = src.shape
    for i in range(h):
        for j in range(w):
            v = np.uint8(g[i, j])
            dst[i, j, 0] = v
            dst[i, j, 1] = v
            dst[i, j, 2] = v


@jit
def mean_grey(src):
    """The mean of the truncated grey (torchvision's contrast centre), as a (1, 1) float32 array."""
    out = np.zeros((1, 1), dtype=np.float32)
    out[0, 0] = np.float32(grey_floor(src).mean())
    return out


@jit
def hue_shift_to(dst, src, hue):
    """torchvision's adjust_hue on uint8: x / 255, RGB -> HSV, h <- (h + hue) mod 1, HSV -> RGB,
    then trunc(255.999 y). ``hue`` in [-0.5, 0.5], a fraction of the colour circle."""
    h_, w_, _ = src.shape
    inv255 = np.float32(1.0 / 255.0)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    sixth = np.float32(1.0 / 6.0)
    six = np.float32(6.0)
    back = np.float32(255.0 + 1.0 - 1e-3)
    shift = np.float32(hue)
    for i in range(h_):
        for j in range(w_):
            r = np.float32(src[i, j, 0]) * inv255
            g = np.float32(src[i, j, 1]) * inv255
            b = np.float32(src[i, j, 2]) * inv255
            maxc = max(r, max(g, b))
            minc = min(r, min(g, b))
            rng = maxc - minc
            if rng == zero:  # grey: no hue, no saturation; torchvision gives back (v, v, v)
                s = zero
                hh = zero
            else:
                s = rng / maxc
                rc = (maxc - r) / rng
                gc = (maxc - g) / rng
                bc = (maxc - b) / rng
                if maxc == r:
                    hh = bc - gc
                elif maxc == g:
                    hh = (rc + np.float32(2.0)) - bc
                else:
                    hh = (gc + np.float32(4.0)) - rc
                hh = hh * sixth + one
                hh = hh - np.floor(hh)  # fmod(., 1) of a positive number
            hh = hh + shift
            hh = hh - np.floor(hh)  # remainder(., 1): in [0, 1)
            h6 = hh * six
            k = np.floor(h6)
            f = h6 - k
            sf = s * f
            q = min(max((one - sf) * maxc, zero), one)
            t = min(max((sf + (one - s)) * maxc, zero), one)
            p = min(max((one - s) * maxc, zero), one)
            sector = int(k) % 6
            if sector == 0:
                ro, go, bo = maxc, t, p
            elif sector == 1:
                ro, go, bo = q, maxc, p
            elif sector == 2:
                ro, go, bo = p, maxc, t
            elif sector == 3:
                ro, go, bo = p, q, maxc
            elif sector == 4:
                ro, go, bo = t, p, maxc
            else:
                ro, go, bo = maxc, p, q
            dst[i, j, 0] = np.uint8(ro * back)
            dst[i, j, 1] = np.uint8(go * back)
            dst[i, j, 2] = np.uint8(bo * back)
