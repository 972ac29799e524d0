"""Fused CPU kernels for the DALI pipeline, compiled with Numba and run by DALI's ``numba_function``.

Four stages of a view: colour (jitter + grey), Gaussian blur, RandAugment and jigsaw. Each is one
call per view that draws its own randomness from a few uniforms DALI generates, so the pipeline
needs no conditionals. Per-stage costs against DALI's operators: ``tools/bench_stages.py``.

DALI's CPU operators that mix colour channels per pixel (``coord_transform``, ``color_twist``,
``hsv``) cost about 1.1 ms per 224x224 view on the 2-core development VM, and the brightness /
contrast pass with its grey mean another 0.1-0.3 ms: together the largest share of a CPU view
(``docs/benchmarks.md``). The colour kernel here does the whole colour stage of one view in one
pass over its pixels (about 0.15 ms per 224 view on the same VM): the jitter draw, brightness,
contrast around the view's mean grey, saturation, hue, and the grayscale conversion.

DALI calls the compiled function once per sample from its own worker threads (no Python, no
GIL), so it parallelises like any DALI CPU operator. Only the CPU pipeline uses it; the GPU keeps
DALI's GPU operators. Without Numba (or with ``ENSIAM_CPU_KERNELS=dali``) the pipeline falls
back to DALI's own operators, which give the same distribution of views, more slowly.

Colour semantics (same as ``pipelines.dali.colour``): with probability jitter_p a view gets
brightness b, contrast c (around its mean ITU-R 601 grey), saturation s (a blend with the luma
grey) and a hue rotation by theta about the grey diagonal, in that fixed order, each factor drawn
uniformly from its preset range; then with probability grayscale_p the view becomes its luma.
All steps are linear, so they are one affine map per view, rounded and saturated once.
"""

from __future__ import annotations

import os
import threading

import numpy as np

# Layout of the per-preset constant vector handed to the kernel (see ``colour_constants``).
_P_JITTER, _B_LO, _B_HI, _C_LO, _C_HI, _S_LO, _S_HI, _H_MAX, _P_GREY = range(9)
_MATS = 9  # C0, C1, C2, C3 (chroma basis) and G (grey projection), 9 floats each, row-major
N_DRAWS = 6  # uniform [0, 1) draws per view: apply, b, c, s, hue, grey


def colour_constants(preset, chroma_matrices) -> np.ndarray:
    """The constants of one preset: probabilities, factor ranges and the chroma basis.

    ``chroma_matrices(grey)`` is ``pipelines.dali._chroma_matrices`` (one definition of the maths).
    """
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


BLUR_DRAWS = 2  # uniform [0, 1) draws per view: apply, sigma


def blur_constants(preset) -> np.ndarray:
    """(blur_p, sigma_lo, sigma_hi) of one preset."""
    return np.float32([preset.blur_p, *preset.blur_sigma])


def blur_run(out, img, draws, consts):
    """One view: Gaussian blur with probability consts[0] and sigma ~ U(consts[1], consts[2]).

    The kernel is the one torchvision's GaussianBlur uses: 2 * ceil(3 sigma) + 1 taps of a
    normalised Gaussian, reflect-101 borders; a row pass into float rows, then a column pass,
    rounded once. The inner loops run over whole rows of the interleaved HWC image (views
    starting at offset 0, so Numba vectorises them).
    """
    h, w, ch = img.shape
    row_len = w * ch
    src = img.reshape(h, row_len)
    dst = out.reshape(h, row_len)
    if not draws[0] < consts[0]:
        copy_image(out, img)
        return
    sigma = np.float32(consts[1] + draws[1] * (consts[2] - consts[1]))
    r = int(np.ceil(np.float32(3.0) * sigma))
    taps = np.empty(r + 1, dtype=np.float32)  # symmetric: taps[k] weighs offsets +k and -k
    total = np.float32(0.0)
    for k in range(r + 1):
        v = np.float32(np.exp(np.float32(-0.5) * np.float32(k * k) / (sigma * sigma)))
        taps[k] = v
        total += v if k == 0 else np.float32(2.0) * v
    for k in range(r + 1):
        taps[k] /= total
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
                t[j] += wk * (a[j] + b[j])
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
                acc[j] += wk * (a[j] + b[j])
        d = dst[y]
        for j in range(row_len):
            d[j] = np.uint8(min(max(acc[j], lo), hi) + half)

# --------------------------------------------------------------------------- RandAugment
#
# torchvision's RandAugment (``transforms.v2.RandAugment``, nearest interpolation, fill 0) on one
# uint8 HWC view: n operations, each drawn uniformly from the 14 below, signed magnitudes negated
# with probability 1/2, every operation with torchvision's uint8 arithmetic (float32, clamped,
# truncated). Geometric operations sample the inverse affine map at pixel centres, as
# torchvision's affine grid and grid_sample(align_corners=False) do.

RA_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
RA_DRAWS_PER_OP = 2  # uniform [0, 1) draws per operation: which operation, sign


def randaugment_constants(preset, max_translate_rel: float) -> np.ndarray:
    """(num_ops, magnitude, num_magnitude_bins, max_translate_rel) of one preset."""
    return np.float32([preset.randaugment_n, preset.randaugment_m, preset.randaugment_bins, max_translate_rel])


def copy_image(dst, src):
    """dst[...] = src for two C-contiguous HWC uint8 images, as one flat (vectorised) loop; Numba's
    3-D slice assignment is about 10x slower."""
    n = src.size
    d = dst.reshape(n)
    s = src.reshape(n)
    for i in range(n):
        d[i] = s[i]


def inverse_affine(angle_deg, tx, ty, shear_x_deg, shear_y_deg, cx, cy):
    """torchvision's inverse affine matrix (scale 1) in pixel units about the image centre:
    a source point is (m[0] x + m[1] y + m[2], m[3] x + m[4] y + m[5]) for output point (x, y)."""
    rot = np.radians(angle_deg)
    sx = np.radians(shear_x_deg)
    sy = np.radians(shear_y_deg)
    a = np.cos(rot - sy) / np.cos(sy)
    b = -(a * np.tan(sx) + np.sin(rot))
    c = np.sin(rot - sy) / np.cos(sy)
    d = np.cos(rot) - c * np.tan(sx)
    m = np.empty(6, dtype=np.float64)
    m[0] = d
    m[1] = -b
    m[3] = -c
    m[4] = a
    m[2] = cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] = cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


def warp_nearest(dst, src, m):
    """dst = src sampled through the inverse map m (nearest, round half to even, 0 outside)."""
    h, w, ch = src.shape
    m0 = np.float32(m[0])
    m1 = np.float32(m[1])
    m2 = np.float32(m[2])
    m3 = np.float32(m[3])
    m4 = np.float32(m[4])
    m5 = np.float32(m[5])
    half_w = np.float32(0.5 * w - 0.5)
    half_h = np.float32(0.5 * h - 0.5)
    for i in range(h):
        y = np.float32(i) - half_h
        for j in range(w):
            x = np.float32(j) - half_w
            ix = int(np.rint(m0 * x + m1 * y + m2 + half_w))
            iy = int(np.rint(m3 * x + m4 * y + m5 + half_h))
            if 0 <= ix < w and 0 <= iy < h:
                for c in range(ch):
                    dst[i, j, c] = src[iy, ix, c]
            else:
                for c in range(ch):
                    dst[i, j, c] = 0


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


def sharpness_to(dst, src, factor):
    """torchvision's adjust_sharpness: blend with the rounded 3x3 smoothing (5 at the centre, 1
    around, / 13) inside the border; border pixels are kept."""
    h, w, ch = src.shape
    copy_image(dst, src)
    if h <= 2 or w <= 2:
        return
    a = np.float32(1.0 / 13.0)
    b = np.float32(5.0 / 13.0)
    q = np.float64(np.float32(1.0 - factor))
    row_len = w * ch
    n = row_len - 2 * ch  # interior values of a row
    rows = src.reshape(h, row_len)
    out_rows = dst.reshape(h, row_len)
    lo = np.float32(0.0)
    hi = np.float32(255.0)
    for i in range(1, h - 1):
        # the 3x3 neighbourhood as nine row views that all start at offset 0 (Numba vectorises)
        ul = rows[i - 1, 0:n]
        uc = rows[i - 1, ch : ch + n]
        ur = rows[i - 1, 2 * ch : 2 * ch + n]
        ml = rows[i, 0:n]
        mc = rows[i, ch : ch + n]
        mr = rows[i, 2 * ch : 2 * ch + n]
        dl = rows[i + 1, 0:n]
        dc = rows[i + 1, ch : ch + n]
        dr = rows[i + 1, 2 * ch : 2 * ch + n]
        o = out_rows[i, ch : ch + n]
        for k in range(n):
            s = a * np.float32(ul[k])
            s += a * np.float32(uc[k])
            s += a * np.float32(ur[k])
            s += a * np.float32(ml[k])
            s += b * np.float32(mc[k])
            s += a * np.float32(mr[k])
            s += a * np.float32(dl[k])
            s += a * np.float32(dc[k])
            s += a * np.float32(dr[k])
            x = np.float32(mc[k])
            v = np.float32(np.float64(x) + q * np.float64(np.rint(s) - x))  # fused, as torch's add_
            o[k] = np.uint8(min(max(v, lo), hi))


def autocontrast_to(dst, src):
    """torchvision's autocontrast: each channel stretched to [0, 255] (unchanged if flat)."""
    h, w, ch = src.shape
    for c in range(ch):
        lo = 255
        hi = 0
        for i in range(h):
            for j in range(w):
                v = src[i, j, c]
                lo = min(lo, v)
                hi = max(hi, v)
        if hi == lo:
            for i in range(h):
                for j in range(w):
                    dst[i, j, c] = src[i, j, c]
            continue
        inv_scale = np.float32(hi - lo) * np.float32(1.0 / 255.0)
        for i in range(h):
            for j in range(w):
                v = (np.float32(src[i, j, c]) - np.float32(lo)) / inv_scale
                dst[i, j, c] = np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


def equalize_to(dst, src):
    """torchvision's (PIL's) histogram equalisation per channel."""
    h, w, ch = src.shape
    n = h * w
    for c in range(ch):
        hist = np.zeros(256, dtype=np.int64)
        for i in range(h):
            for j in range(w):
                hist[src[i, j, c]] += 1
        last = 255
        while hist[last] == 0:
            last -= 1
        step = (n - hist[last]) // 255
        if step == 0:
            for i in range(h):
                for j in range(w):
                    dst[i, j, c] = src[i, j, c]
            continue
        lut = np.zeros(256, dtype=np.uint8)
        cum = 0
        for k in range(255):
            cum += hist[k]
            lut[k + 1] = min(255, (cum + step // 2) // step)
        for i in range(h):
            for j in range(w):
                dst[i, j, c] = lut[src[i, j, c]]


def tv_linspace(start, end, bins, index):
    """Element ``index`` of torch.linspace(start, end, bins) in float32, computed as torch does
    (float32 step, from the nearer end), so magnitudes match torchvision's to the last bit."""
    start32 = np.float32(start)
    end32 = np.float32(end)
    step = np.float32((end32 - start32) / np.float32(bins - 1))
    if index < bins // 2:
        return np.float64(np.float32(start32 + step * np.float32(index)))
    return np.float64(np.float32(end32 - step * np.float32(bins - 1 - index)))


def ra_apply(dst, src, op, sign, mag, bins, max_translate_rel):
    """Operation ``op`` (an index into RA_OPS) at magnitude bin ``mag`` with ``sign`` (+-1)."""
    h, w, ch = src.shape
    mi = int(mag)
    nb = int(bins)
    if op == 0:
        copy_image(dst, src)
    elif op == 1 or op == 2:  # shears about the top-left corner
        deg = np.degrees(np.arctan(sign * tv_linspace(0.0, 0.3, nb, mi)))
        if op == 1:
            m = inverse_affine(0.0, 0.0, 0.0, deg, 0.0, -0.5 * w, -0.5 * h)
        else:
            m = inverse_affine(0.0, 0.0, 0.0, 0.0, deg, -0.5 * w, -0.5 * h)
        warp_nearest(dst, src, m)
    elif op == 3:  # torchvision truncates translations to whole pixels
        tx = float(int(sign * tv_linspace(0.0, max_translate_rel * w, nb, mi)))
        warp_nearest(dst, src, inverse_affine(0.0, tx, 0.0, 0.0, 0.0, 0.0, 0.0))
    elif op == 4:
        ty = float(int(sign * tv_linspace(0.0, max_translate_rel * h, nb, mi)))
        warp_nearest(dst, src, inverse_affine(0.0, 0.0, ty, 0.0, 0.0, 0.0, 0.0))
    elif op == 5:  # rotate(angle) is affine(-angle) in torchvision
        warp_nearest(dst, src, inverse_affine(-sign * tv_linspace(0.0, 30.0, nb, mi), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    elif op == 6:
        zero = np.zeros((1, 1), dtype=np.float32)
        blend_to(dst, src, zero, 1.0 + sign * tv_linspace(0.0, 0.9, nb, mi))
    elif op == 7:
        blend_to(dst, src, grey_floor(src), 1.0 + sign * tv_linspace(0.0, 0.9, nb, mi))
    elif op == 8:
        mean = np.zeros((1, 1), dtype=np.float32)
        mean[0, 0] = np.float32(grey_floor(src).mean())
        blend_to(dst, src, mean, 1.0 + sign * tv_linspace(0.0, 0.9, nb, mi))
    elif op == 9:
        sharpness_to(dst, src, 1.0 + sign * tv_linspace(0.0, 0.9, nb, mi))
    elif op == 10:
        bits = int(np.rint(8.0 - mag / ((bins - 1.0) / 4.0)))
        mask = np.uint8((((1 << bits) - 1) << (8 - bits)) & 255)
        for i in range(h):
            for j in range(w):
                for c in range(ch):
                    dst[i, j, c] = src[i, j, c] & mask
    elif op == 11:
        threshold = 255.0 * tv_linspace(1.0, 0.0, nb, mi)
        for i in range(h):
            for j in range(w):
                for c in range(ch):
                    v = src[i, j, c]
                    dst[i, j, c] = 255 - v if v >= threshold else v
    elif op == 12:
        autocontrast_to(dst, src)
    else:
        equalize_to(dst, src)


def randaugment_run(out, img, draws, consts):
    """One view: RandAugment(consts[0] ops, magnitude consts[1] of consts[2] bins), translations up
    to consts[3] of the side; draws[2k], draws[2k + 1] pick operation k and its sign."""
    n_ops = int(consts[0])
    mag = np.float64(consts[1])
    bins = np.float64(consts[2])
    h, w, ch = img.shape
    a = np.empty((h, w, ch), dtype=np.uint8)
    b = np.empty((h, w, ch), dtype=np.uint8)
    copy_image(a, img)
    for k in range(n_ops):
        op = min(int(draws[2 * k] * len_ops), len_ops - 1)
        sign = -1.0 if draws[2 * k + 1] <= 0.5 else 1.0
        ra_apply(b, a, op, sign, mag, bins, np.float64(consts[3]))
        a, b = b, a
    copy_image(out, a)



def jigsaw_run(out, img, draws, consts):
    """One view cut into a consts[0] x consts[0] grid of tiles, put back in the order that sorts
    ``draws`` (one uniform key per tile): a uniformly random permutation per view."""
    grid = int(consts[0])
    h, w, ch = img.shape
    th = h // grid
    tw = w // grid
    order = np.argsort(draws[: grid * grid])
    src_rows = img.reshape(h, w * ch)
    dst_rows = out.reshape(h, w * ch)
    span = tw * ch
    for p in range(grid * grid):
        t = order[p]
        sy = (t // grid) * th
        sx = (t % grid) * span
        dy = (p // grid) * th
        dx = (p % grid) * span
        for i in range(th):
            src = src_rows[sy + i, sx : sx + span]  # contiguous, offset 0: a plain vectorised copy
            dst = dst_rows[dy + i, dx : dx + span]
            for j in range(span):
                dst[j] = src[j]


def same_shape_as_first(outs, ins):
    """Numba setup function: output 0 has the shape of input 0 (an HWC image), per sample."""
    for i in range(len(outs[0])):
        for d in range(3):
            outs[0][i][d] = ins[0][i][d]


len_ops = len(RA_OPS)  # a module constant, as Numba needs it inside randaugment_run

try:  # the helpers the kernels call must be compiled functions; DALI compiles only the entry points
    from numba import njit as _njit
except Exception:  # no usable Numba: backend() says 'dali' and nothing here runs
    _njit = None


def _jit(fn):
    """Compile with Numba, cached on disk when the cache can be written (next to this file, or
    Numba's per-user cache directory), so only the first process pays the compile time."""
    try:
        return _njit(cache=True)(fn)
    except Exception:  # no writable cache location: compile in every process
        return _njit(fn)


if _njit is not None:
    copy_image = _jit(copy_image)
    inverse_affine = _jit(inverse_affine)
    warp_nearest = _jit(warp_nearest)
    blend_to = _jit(blend_to)
    grey_floor = _jit(grey_floor)
    sharpness_to = _jit(sharpness_to)
    autocontrast_to = _jit(autocontrast_to)
    equalize_to = _jit(equalize_to)
    tv_linspace = _jit(tv_linspace)
    ra_apply = _jit(ra_apply)
    _colour_impl = _jit(colour_run)
    _blur_impl = _jit(blur_run)
    _randaugment_impl = _jit(randaugment_run)
    _jigsaw_impl = _jit(jigsaw_run)


# The entry points DALI compiles in every process (into a C callback, which Numba cannot cache):
# one call each, into the cached implementations above.
def _colour_entry(out, img, draws, consts):
    _colour_impl(out, img, draws, consts)


def _blur_entry(out, img, draws, consts):
    _blur_impl(out, img, draws, consts)


def _randaugment_entry(out, img, draws, consts):
    _randaugment_impl(out, img, draws, consts)


def _jigsaw_entry(out, img, draws, consts):
    _jigsaw_impl(out, img, draws, consts)


_LOCK = threading.Lock()
_OPS: dict[str, object] = {}
_STATE: dict[str, object] = {}


def backend() -> str:
    """'numba' when the fused kernels can run here, else 'dali' (DALI's own CPU operators).

    ``ENSIAM_CPU_KERNELS=dali`` forces DALI's operators (e.g. to compare the two, or where Numba
    misbehaves); ``=numba`` makes a missing Numba an error instead of a silent fallback.
    """
    want = os.environ.get("ENSIAM_CPU_KERNELS", "auto").strip().lower()
    if want not in ("auto", "numba", "dali"):
        raise ValueError(f"ENSIAM_CPU_KERNELS must be auto, numba or dali, got {want!r}")
    if want == "dali":
        return "dali"
    if "available" not in _STATE:
        try:
            import numba  # noqa: F401
            from nvidia.dali.plugin.numba.experimental import NumbaFunction  # noqa: F401

            _STATE["available"] = True
        except Exception as e:  # ImportError, or a Numba that does not match the installed NumPy
            _STATE["available"] = False
            _STATE["why"] = f"{type(e).__name__}: {e}"
    if want == "numba" and not _STATE["available"]:
        raise RuntimeError(f"ENSIAM_CPU_KERNELS=numba but Numba cannot be used here ({_STATE['why']})")
    return "numba" if _STATE["available"] else "dali"


def _numba_op(name: str, run_fn):
    """``run_fn(out, img, draws, consts)`` as a DALI CPU operator (uint8 HWC in and out), compiled
    once per process (2-3 s the first time) and shared by every view and pipeline.

    Calls are serialised: the loader defines the next epoch's pipeline in a background thread
    while another definition may be under way, and one operator object serves both.
    """
    with _LOCK:
        if name not in _OPS:
            from nvidia.dali import types
            from nvidia.dali.plugin.numba.experimental import NumbaFunction

            _OPS[name] = NumbaFunction(
                run_fn=run_fn,
                setup_fn=same_shape_as_first,
                in_types=[types.UINT8, types.FLOAT, types.FLOAT],
                ins_ndim=[3, 1, 1],
                out_types=[types.UINT8],
                outs_ndim=[3],
            )
        op = _OPS[name]

    def call(*inputs):
        from nvidia.dali import fn

        with _LOCK:
            out = op(*inputs)
        return fn.reshape(out, layout="HWC")  # numba_function outputs carry no layout

    return call


def blur_op():
    """The blur kernel as a DALI operator (see ``_numba_op``)."""
    return _numba_op("blur", _blur_entry)


def randaugment_op():
    """The RandAugment kernel as a DALI operator (see ``_numba_op``)."""
    return _numba_op("randaugment", _randaugment_entry)


def jigsaw_op():
    """The jigsaw kernel as a DALI operator (see ``_numba_op``)."""
    return _numba_op("jigsaw", _jigsaw_entry)


def colour_op():
    """The colour kernel as a DALI operator (see ``_numba_op``)."""
    return _numba_op("colour", _colour_entry)


__all__ = [
    "BLUR_DRAWS",
    "N_DRAWS",
    "backend",
    "blur_constants",
    "blur_op",
    "blur_run",
    "colour_constants",
    "colour_op",
    "colour_run",
    "jigsaw_op",
    "jigsaw_run",
    "RA_DRAWS_PER_OP",
    "RA_OPS",
    "randaugment_constants",
    "randaugment_op",
    "randaugment_run",
    "same_shape_as_first",
]
