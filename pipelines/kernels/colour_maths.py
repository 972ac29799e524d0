"""Colour maths shared by the CPU kernels (and, for the constants, by the DALI operators)."""

from __future__ import annotations

import numpy as np

from pipelines.kernels.common import jit

# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale (and DALI's hsv) use.
LUMA = (0.299, 0.587, 0.114)


def chroma_matrices(grey: bool) -> tuple[np.ndarray, ...]:
    """Constants (C0, C1, C2, C3) with hue(theta) . saturation(s) = C0 + s C1 + s cos C2 + s sin C3.

    Saturation is torchvision's blend with the luma grey, s I + (1 - s) 1 l^T. The hue shift is a
    rotation by theta about the grey diagonal (1, 1, 1): it keeps each pixel's channel sum and its
    distance from grey and, like HSV's hue, turns red into green at 120 degrees (a YIQ rotation,
    what DALI's ``hsv`` does, spreads the channels much less than torchvision's hue shift). With
    ``grey`` the matrices are premultiplied by the grey projection 1 l^T (jitter, then grayscale).
    """
    luma = np.array(LUMA, dtype=np.float64)
    eye, ones = np.eye(3), np.ones(3)
    u = ones / np.sqrt(3.0)
    diag = np.outer(u, u)
    cross = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    to_luma = np.outer(ones, luma)
    keep_luma = eye - to_luma
    mats = (to_luma, diag @ keep_luma, (eye - diag) @ keep_luma, cross @ keep_luma)
    if grey:
        mats = tuple(to_luma @ m for m in mats)
    return tuple(np.float32(m) for m in mats)


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


