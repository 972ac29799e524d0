"""The random resized crop (and the flip that follows it) as one CPU kernel, with torchvision's
resampling: ``resized_crop(img, top, left, h, w, [size, size], antialias=True)`` on uint8.

The window is drawn by DALI's ``fn.random_crop_generator`` (the same draw as
``fn.random_resized_crop``: area and aspect ranges, ten attempts, then the centre fallback); this
kernel cuts it out and resamples it as torchvision does on uint8 tensors (PIL's antialiased
bilinear filter): the horizontal pass first, rounded to uint8, then the vertical pass. The taps and
weights are PIL's; the sums are in float32 where torchvision uses fixed point, so a value differs
by one level in well under 1% of cases (DALI's own resize differs by up to 30 levels near the
edges). Each pass runs along contiguous rows (the window is transposed for the horizontal pass)
so that the compiler can vectorise it. A mirrored view reads its columns in reverse order: the
flip costs nothing.
"""

from __future__ import annotations

import numpy as np

from pipelines.kernels.common import dali_entry, jit, jit_ieee

# The per-view vector handed to the kernel: top, left, height, width of the window, mirror (0/1).
_TOP, _LEFT, _HEIGHT, _WIDTH, _MIRROR = 0, 1, 2, 3, 4


@jit
def taps(in_len, out_size):
    """PIL's antialiased bilinear taps for ``in_len`` -> ``out_size`` samples: first input index,
    tap count and normalised weights (float32) of every output sample. Downscaling widens the
    triangle filter by the scale (antialiasing); upscaling is plain bilinear."""
    scale = in_len / out_size
    width = max(scale, 1.0)  # the filter's half-width, in input samples
    kmax = int(np.ceil(width)) * 2 + 1
    first = np.empty(out_size, dtype=np.int64)
    count = np.empty(out_size, dtype=np.int64)
    weights = np.zeros((out_size, kmax), dtype=np.float32)
    raw = np.zeros(kmax, dtype=np.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo = max(int(centre - width + 0.5), 0)
        hi = min(int(centre + width + 0.5), in_len)
        total = 0.0
        for j in range(hi - lo):
            v = 1.0 - abs((j + lo - centre + 0.5) / width)
            raw[j] = v if v > 0.0 else 0.0
            total += raw[j]
        for j in range(hi - lo):
            weights[i, j] = raw[j] / total if total != 0.0 else 0.0
        first[i] = lo
        count[i] = hi - lo
    return first, count, weights


@jit_ieee
def _pass(dst, src, first, count, weights):
    """``dst[i] = trunc(clamp(sum_k weights[i, k] * src[first[i] + k] + 0.5))`` row by row: one
    separable pass along the first axis, every row a contiguous uint8 vector."""
    n = src.shape[1]
    acc = np.empty(n, dtype=np.float32)
    half = np.float32(0.5)
    top = np.float32(255.0)
    zero = np.float32(0.0)
    for i in range(dst.shape[0]):
        for t in range(n):
            acc[t] = half
        for k in range(count[i]):
            w = weights[i, k]
            row = src[first[i] + k]
            for t in range(n):
                acc[t] += w * np.float32(row[t])
        out = dst[i]
        for t in range(n):
            out[t] = np.uint8(min(max(acc[t], zero), top))


@jit
def crop_run(out, img, window):
    """``out`` (S, S, 3) uint8 = the window ``window`` (top, left, height, width, mirror) of ``img``
    (H, W, 3) uint8 resized to S x S as torchvision resizes it, mirrored when ``window[4]`` is 1."""
    size = out.shape[0]
    top = int(window[_TOP])
    left = int(window[_LEFT])
    h = int(window[_HEIGHT])
    w = int(window[_WIDTH])
    mirror = window[_MIRROR] > 0.5
    pixels = img.shape[1] * 3
    flat = img.reshape(img.shape[0] * pixels)
    # the window transposed, one row per column: cols[x, 3 y + c]
    cols = np.empty((w, h * 3), dtype=np.uint8)
    for y in range(h):
        base = (top + y) * pixels + left * 3
        for x in range(w):
            cols[x, 3 * y] = flat[base + 3 * x]
            cols[x, 3 * y + 1] = flat[base + 3 * x + 1]
            cols[x, 3 * y + 2] = flat[base + 3 * x + 2]
    first, count, weights = taps(w, size)
    across = np.empty((size, h * 3), dtype=np.uint8)
    _pass(across, cols, first, count, weights)  # the horizontal pass, rounded as torchvision's
    rows = np.empty((h, size * 3), dtype=np.uint8)
    for j in range(size):
        jj = size - 1 - j if mirror else j
        src = across[j]
        for y in range(h):
            rows[y, 3 * jj] = src[3 * y]
            rows[y, 3 * jj + 1] = src[3 * y + 1]
            rows[y, 3 * jj + 2] = src[3 * y + 2]
    first, count, weights = taps(h, size)
    _pass(out.reshape(size, size * 3), rows, first, count, weights)  # the vertical pass


_entry = dali_entry(crop_run, 2)  # the DALI operator's entry point


__all__ = ["crop_run", "taps"]
