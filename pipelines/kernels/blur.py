"""The Gaussian blur stage of a view as one CPU kernel."""

from __future__ import annotations

import numpy as np

from pipelines.kernels.common import copy_image, dali_entry, jit
from pipelines.kernels.twin import fmul, twin

BLUR_DRAWS = 2  # uniform [0, 1) draws per view: apply, sigma


def blur_params_len(preset) -> int:
    """The length of a view's parameter vector (``blur_params``): apply, radius, then the taps of
    the widest kernel the preset draws."""
    return 3 + int(np.ceil(np.float32(3.0) * np.float32(preset.blur_sigma[1])))


def blur_constants(preset) -> np.ndarray:
    """(blur_p, sigma_lo, sigma_hi) of one preset."""
    return np.float32([preset.blur_p, *preset.blur_sigma])


@jit
def blur_params(draws, consts, params):
    """One view's blur: ``params`` = [apply (0/1), r, taps[0..r], 0...], the taps torchvision's
    GaussianBlur uses (2 r + 1 of a normalised Gaussian, r = ceil(3 sigma), symmetric: taps[k]
    weighs offsets +k and -k), with probability consts[0] and sigma ~ U(consts[1], consts[2])."""
    for i in range(params.size):
        params[i] = 0.0
    if not draws[0] < consts[0]:
        return
    sigma = np.float32(consts[1] + draws[1] * (consts[2] - consts[1]))
    r = int(np.ceil(np.float32(3.0) * sigma))
    taps = params[2 : 3 + r]
    total = np.float32(0.0)
    for k in range(r + 1):
        v = np.float32(np.exp(np.float32(-0.5) * np.float32(k * k) / (sigma * sigma)))
        taps[k] = v
        total += v if k == 0 else np.float32(2.0) * v
    for k in range(r + 1):
        taps[k] /= total
    params[0] = 1.0
    params[1] = r


@twin
def reflect(i, n):
    """Index ``i`` of a side of ``n`` samples, reflect-101 (for -n < i < 2 n - 1)."""
    if i < 0:
        return -i
    if i > n - 1:
        return 2 * (n - 1) - i
    return i


@twin
def blur_row(src, y, x, c, taps, rx):
    """The row pass of ``blur_apply`` at one place: the float32 sum over the row, in its order."""
    w = src.shape[1]
    t = taps[0] * np.float32(src[y, x, c])
    for k in range(1, rx + 1):
        a = np.float32(src[y, reflect(x - k, w), c])
        b = np.float32(src[y, reflect(x + k, w), c])
        t += fmul(taps[k], a + b)
    return t


@twin
def blur_value(src, y, x, c, taps, rx, ry):
    """One output value of ``blur_apply`` (its row sums recomputed, in the same order)."""
    h = src.shape[0]
    acc = taps[0] * blur_row(src, y, x, c, taps, rx)
    for k in range(1, ry + 1):
        a = blur_row(src, reflect(y - k, h), x, c, taps, rx)
        b = blur_row(src, reflect(y + k, h), x, c, taps, rx)
        acc += fmul(taps[k], a + b)
    return np.uint8(min(max(acc, np.float32(0.0)), np.float32(255.0)) + np.float32(0.5))


@jit
def blur_apply(out, img, params):
    """One view blurred with ``params`` (``blur_params``): a row pass into float rows, then a column
    pass, rounded once, reflect-101 borders. The inner loops run over whole rows of the interleaved
    HWC image (views starting at offset 0, so Numba vectorises them); ``blur_value`` is the same
    sum for one output value (the CUDA kernel's)."""
    h, w, ch = img.shape
    row_len = w * ch
    src = img.reshape(h, row_len)
    dst = out.reshape(h, row_len)
    if params[0] == 0.0:
        copy_image(out, img)
        return
    r = int(params[1])
    taps = params[2 : 3 + r]
    # reflect-101 needs r <= side - 1; a wider kernel is clipped there (only for images < 13 px)
    rx = min(r, w - 1)
    ry = min(r, h - 1)
    pad = rx * ch
    row = np.empty(row_len + 2 * pad, dtype=np.float32)
    rows = np.empty((h + 2 * ry, row_len), dtype=np.float32)  # rows, reflect-101 padded
    w0 = taps[0]
    for y in range(h):
        s = src[y]
        mid = row[pad : pad + row_len]
        for j in range(row_len):
            mid[j] = s[j]
        for x in range(1, rx + 1):
            for c in range(ch):
                row[pad - x * ch + c] = row[pad + x * ch + c]
                row[pad + row_len - ch + x * ch + c] = row[pad + row_len - ch - x * ch + c]
        t = rows[y + ry]
        for j in range(row_len):
            t[j] = w0 * mid[j]
        for k in range(1, rx + 1):
            wk = taps[k]
            a = row[pad - k * ch : pad - k * ch + row_len]
            b = row[pad + k * ch : pad + k * ch + row_len]
            for j in range(row_len):
                t[j] += fmul(wk, a[j] + b[j])
    for k in range(1, ry + 1):
        rows[ry - k] = rows[ry + k]
        rows[ry + h - 1 + k] = rows[ry + h - 1 - k]
    acc = np.empty(row_len, dtype=np.float32)
    lo = np.float32(0.0)
    hi = np.float32(255.0)
    half = np.float32(0.5)
    for y in range(h):
        c0 = rows[y + ry]
        for j in range(row_len):
            acc[j] = w0 * c0[j]
        for k in range(1, ry + 1):
            wk = taps[k]
            a = rows[y + ry - k]
            b = rows[y + ry + k]
            for j in range(row_len):
                acc[j] += fmul(wk, a[j] + b[j])
        d = dst[y]
        for j in range(row_len):
            d[j] = np.uint8(min(max(acc[j], lo), hi) + half)


@jit
def blur_run(out, img, draws, consts):
    """One view: Gaussian blur with probability consts[0] and sigma ~ U(consts[1], consts[2])
    (``blur_params``, then ``blur_apply``)."""
    params = np.empty(3 + int(np.ceil(np.float32(3.0) * np.float32(consts[2]))), dtype=np.float32)
    blur_params(draws, consts, params)
    blur_apply(out, img, params)


_entry = dali_entry(blur_run, 3)  # the DALI operator's entry point
