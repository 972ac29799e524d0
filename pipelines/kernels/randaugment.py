"""RandAugment of a view as one CPU kernel.

torchvision's RandAugment (``transforms.v2.RandAugment``, nearest interpolation, fill 0) on one
uint8 HWC view: n operations, each drawn uniformly from the 14 below, signed magnitudes negated
with probability 1/2, every operation with torchvision's uint8 arithmetic (float32, clamped,
truncated). Geometric operations sample the inverse affine map at pixel centres, as
torchvision's affine grid and grid_sample(align_corners=False) do.
"""

from __future__ import annotations

import numpy as np

from pipelines.kernels.colour_maths import blend_const_to, mean_grey_value, saturate_rq_to
from pipelines.kernels.common import copy_image, dali_entry, jit
from pipelines.kernels.jigsaw import jigsaw_apply
from pipelines.kernels.twin import fmul, twin

# torchvision's RandAugment translates by up to 150/331 of the image side at the top magnitude.
MAX_TRANSLATE_REL = 150.0 / 331.0

RA_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
RA_DRAWS_PER_OP = 2  # uniform [0, 1) draws per operation: which operation, sign


def randaugment_constants(preset, max_translate_rel: float = MAX_TRANSLATE_REL) -> np.ndarray:
    """(num_ops, magnitude, num_magnitude_bins, max_translate_rel) of one preset."""
    return np.float32([preset.randaugment_n, preset.randaugment_m, preset.randaugment_bins, max_translate_rel])


@jit
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


@twin
def rint_even(v):
    """np.rint of a float32 (round half to even), from floor and compares (both targets)."""
    f = np.floor(v)
    d = v - f
    if d > np.float32(0.5):
        return int(f) + 1
    if d < np.float32(0.5):
        return int(f)
    i = int(f)
    return i + (i & 1)


@twin
def warp_source(i, j, half_h, half_w, m0, m1, m2, m3, m4, m5):
    """The source pixel (row, column) of output pixel (i, j) through the float32 inverse map m
    (nearest, round half to even), relative to the centre offsets ``half_h``, ``half_w``."""
    y = np.float32(i) - half_h
    x = np.float32(j) - half_w
    ix = rint_even(fmul(m0, x) + fmul(m1, y) + m2 + half_w)
    iy = rint_even(fmul(m3, x) + fmul(m4, y) + m5 + half_h)
    return iy, ix


@jit
def warp_nearest(dst, src, m):
    """dst = src sampled through the inverse map m (nearest, round half to even, 0 outside); m is
    rounded to float32 first (``warp_source``)."""
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
        for j in range(w):
            iy, ix = warp_source(i, j, half_h, half_w, m0, m1, m2, m3, m4, m5)
            if 0 <= ix < w and 0 <= iy < h:
                for c in range(ch):
                    dst[i, j, c] = src[iy, ix, c]
            else:
                for c in range(ch):
                    dst[i, j, c] = 0


@twin
def sharp_value(ul, uc, ur, ml, mc, mr, dl, dc, dr, q):
    """torchvision's adjust_sharpness at one interior value: the 3x3 neighbourhood's rounded
    smoothing (5 at the centre, 1 around, / 13) blended with the centre ``mc``; ``q`` = 1 - factor
    (float32)."""
    a = np.float32(1.0 / 13.0)
    b = np.float32(5.0 / 13.0)
    s = a * np.float32(ul)
    s += fmul(a, np.float32(uc))
    s += fmul(a, np.float32(ur))
    s += fmul(a, np.float32(ml))
    s += fmul(b, np.float32(mc))
    s += fmul(a, np.float32(mr))
    s += fmul(a, np.float32(dl))
    s += fmul(a, np.float32(dc))
    s += fmul(a, np.float32(dr))
    x = np.float32(mc)
    v = np.float32(np.float64(x) + np.float64(q) * np.float64(np.float32(rint_even(s)) - x))  # fused, as torch's add_
    return np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


@jit
def sharpness_to(dst, src, q):
    """torchvision's adjust_sharpness with ``q`` = float32(1 - factor): blend with the rounded 3x3
    smoothing (5 at the centre, 1 around, / 13) inside the border; border pixels are kept."""
    h, w, ch = src.shape
    copy_image(dst, src)
    if h <= 2 or w <= 2:
        return
    row_len = w * ch
    n = row_len - 2 * ch  # interior values of a row
    rows = src.reshape(h, row_len)
    out_rows = dst.reshape(h, row_len)
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
            o[k] = sharp_value(ul[k], uc[k], ur[k], ml[k], mc[k], mr[k], dl[k], dc[k], dr[k], q)


@twin
def autocontrast_value(v, lo, hi):
    """torchvision's autocontrast of one value of a channel whose range is [lo, hi], hi > lo."""
    inv_scale = np.float32(hi - lo) * np.float32(1.0 / 255.0)
    y = (np.float32(v) - np.float32(lo)) / inv_scale
    return np.uint8(min(max(y, np.float32(0.0)), np.float32(255.0)))


@jit
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
        for i in range(h):
            for j in range(w):
                dst[i, j, c] = src[i, j, c] if hi == lo else autocontrast_value(src[i, j, c], lo, hi)


@twin
def equalize_lut(hist, n, lut):
    """PIL's (torchvision's) equalisation table of one channel from its 256-bin histogram ``hist``
    of ``n`` values: ``lut`` (256 entries) maps a level to its new level (the identity when the
    channel has a single level or nearly so)."""
    last = 255
    while hist[last] == 0:
        last -= 1
    step = (n - hist[last]) // 255
    if step == 0:
        for k in range(256):
            lut[k] = k
        return
    lut[0] = 0
    cum = 0
    for k in range(255):
        cum += hist[k]
        lut[k + 1] = min(255, (cum + step // 2) // step)


@jit
def equalize_to(dst, src):
    """torchvision's (PIL's) histogram equalisation per channel (``equalize_lut``)."""
    h, w, ch = src.shape
    hist = np.zeros(256, dtype=np.int64)
    lut = np.zeros(256, dtype=np.int64)
    for c in range(ch):
        hist[:] = 0
        for i in range(h):
            for j in range(w):
                hist[src[i, j, c]] += 1
        equalize_lut(hist, h * w, lut)
        for i in range(h):
            for j in range(w):
                dst[i, j, c] = lut[src[i, j, c]]


@jit
def tv_linspace(start, end, bins, index):
    """Element ``index`` of torch.linspace(start, end, bins) in float32, computed as torch does
    (float32 step, from the nearer end), so magnitudes match torchvision's to the last bit."""
    start32 = np.float32(start)
    end32 = np.float32(end)
    step = np.float32((end32 - start32) / np.float32(bins - 1))
    if index < bins // 2:
        return np.float64(np.float32(start32 + step * np.float32(index)))
    return np.float64(np.float32(end32 - step * np.float32(bins - 1 - index)))


# Each operation of a view as RA_PARAMS_PER_OP floats (``ra_op_params``): the operation's index
# in RA_OPS, then its values: a warp's float32 inverse map (6), a blend's ratio and 1 - ratio,
# sharpness's 1 - factor, posterize's mask, solarize's threshold (rounded up: the pixels are whole).
RA_PARAMS_PER_OP = 7


@jit
def ra_op_params(p, op, sign, mag, bins, max_translate_rel, h, w):
    """``p`` (RA_PARAMS_PER_OP floats) = operation ``op`` at magnitude bin ``mag`` with ``sign``
    (+-1) for an h x w view, with torchvision's magnitude tables and conventions."""
    for i in range(RA_PARAMS_PER_OP):
        p[i] = 0.0
    p[0] = op
    mi = int(mag)
    nb = int(bins)
    m = np.zeros(6, dtype=np.float64)
    if op == 1 or op == 2:  # shears about the top-left corner
        deg = np.degrees(np.arctan(sign * tv_linspace(0.0, 0.3, nb, mi)))
        if op == 1:
            m = inverse_affine(0.0, 0.0, 0.0, deg, 0.0, -0.5 * w, -0.5 * h)
        else:
            m = inverse_affine(0.0, 0.0, 0.0, 0.0, deg, -0.5 * w, -0.5 * h)
    elif op == 3:  # torchvision truncates translations to whole pixels
        tx = float(int(sign * tv_linspace(0.0, max_translate_rel * w, nb, mi)))
        m = inverse_affine(0.0, tx, 0.0, 0.0, 0.0, 0.0, 0.0)
    elif op == 4:
        ty = float(int(sign * tv_linspace(0.0, max_translate_rel * h, nb, mi)))
        m = inverse_affine(0.0, 0.0, ty, 0.0, 0.0, 0.0, 0.0)
    elif op == 5:  # rotate(angle) is affine(-angle) in torchvision
        m = inverse_affine(-sign * tv_linspace(0.0, 30.0, nb, mi), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    elif 6 <= op <= 8:  # brightness, color, contrast: blends with ratio 1 + v
        ratio = 1.0 + sign * tv_linspace(0.0, 0.9, nb, mi)
        p[1] = np.float32(ratio)
        p[2] = np.float32(1.0 - ratio)
    elif op == 9:
        p[1] = np.float32(1.0 - (1.0 + sign * tv_linspace(0.0, 0.9, nb, mi)))
    elif op == 10:
        bits = int(np.rint(8.0 - mag / ((bins - 1.0) / 4.0)))
        p[1] = (((1 << bits) - 1) << (8 - bits)) & 255
    elif op == 11:
        p[1] = np.ceil(255.0 * tv_linspace(1.0, 0.0, nb, mi))
    if 1 <= op <= 5:
        for i in range(6):
            p[1 + i] = np.float32(m[i])


@jit
def randaugment_params(draws, consts, h, w, params):
    """One view's operations (``ra_op_params`` each, RA_PARAMS_PER_OP apart): RandAugment(consts[0]
    ops, magnitude consts[1] of consts[2] bins), translations up to consts[3] of the side;
    draws[2k], draws[2k + 1] pick operation k and its sign."""
    n_ops = int(consts[0])
    for k in range(n_ops):
        op = min(int(draws[2 * k] * len_ops), len_ops - 1)
        sign = -1.0 if draws[2 * k + 1] <= 0.5 else 1.0
        p = params[RA_PARAMS_PER_OP * k : RA_PARAMS_PER_OP * (k + 1)]
        ra_op_params(p, op, sign, np.float64(consts[1]), np.float64(consts[2]), np.float64(consts[3]), h, w)


@jit
def ra_apply(dst, src, p):
    """One operation (``ra_op_params``) from ``src`` into a different array ``dst``."""
    h, w, ch = src.shape
    op = int(p[0])
    if op == 0:
        copy_image(dst, src)
    elif op <= 5:
        warp_nearest(dst, src, p[1:7])
    elif op == 6:  # brightness: a blend with black
        blend_const_to(dst, src, np.float32(0.0), np.float32(p[1]), np.float32(p[2]))
    elif op == 7:  # color: a blend with each pixel's grey
        saturate_rq_to(dst, src, np.float32(p[1]), np.float32(p[2]))
    elif op == 8:  # contrast: a blend with the mean grey
        blend_const_to(dst, src, mean_grey_value(src), np.float32(p[1]), np.float32(p[2]))
    elif op == 9:
        sharpness_to(dst, src, np.float32(p[1]))
    elif op == 10:
        mask = np.uint8(p[1])
        for i in range(h):
            for j in range(w):
                for c in range(ch):
                    dst[i, j, c] = src[i, j, c] & mask
    elif op == 11:
        threshold = p[1]
        for i in range(h):
            for j in range(w):
                for c in range(ch):
                    v = src[i, j, c]
                    dst[i, j, c] = 255 - v if v >= threshold else v
    elif op == 12:
        autocontrast_to(dst, src)
    else:
        equalize_to(dst, src)


@jit
def chain_step(dst, src, ra, n_ops, jig, grid, s):
    """Step ``s`` of ``chain_apply``: RandAugment operation ``s`` (``s`` < ``n_ops``), else the jigsaw."""
    if s < n_ops:
        ra_apply(dst, src, ra[RA_PARAMS_PER_OP * s : RA_PARAMS_PER_OP * (s + 1)])
    else:
        jigsaw_apply(dst, src, jig, grid)


@jit
def chain_apply(out, img, scratch, ra, jig, grid):
    """One view through its RandAugment operations (``ra``: ``randaugment_params``, ra.size /
    RA_PARAMS_PER_OP of them), then the jigsaw (``jig``: ``jigsaw_params``, ``grid`` > 0; grid 0:
    none): each step from one buffer into the other, ``img`` -> ... -> ``out`` through one
    ``scratch`` view shaped like ``img`` (the parity of the steps puts the last one in ``out``)."""
    n_ops = ra.size // RA_PARAMS_PER_OP
    steps = n_ops + (1 if grid > 0 and jig[0] != 0.0 else 0)
    if steps == 0:
        copy_image(out, img)
        return
    if steps % 2 == 1:
        chain_step(out, img, ra, n_ops, jig, grid, 0)
    else:
        chain_step(scratch, img, ra, n_ops, jig, grid, 0)
    for s in range(1, steps):
        if (steps - 1 - s) % 2 == 0:
            chain_step(out, scratch, ra, n_ops, jig, grid, s)
        else:
            chain_step(scratch, out, ra, n_ops, jig, grid, s)


@jit
def randaugment_apply(out, img, params):
    """One view through its operations (``randaugment_params``; ``params.size`` / RA_PARAMS_PER_OP
    of them), ping-ponging between ``out`` and one scratch view (``chain_apply``, no jigsaw)."""
    scratch = np.empty(img.shape, dtype=np.uint8)
    chain_apply(out, img, scratch, params, params[0:0], 0)


@jit
def randaugment_run(out, img, draws, consts):
    """One view: RandAugment(consts[0] ops, magnitude consts[1] of consts[2] bins), translations up
    to consts[3] of the side (``randaugment_params`` then ``randaugment_apply``)."""
    h, w, _ = img.shape
    params = np.zeros(RA_PARAMS_PER_OP * int(consts[0]), dtype=np.float32)
    randaugment_params(draws, consts, h, w, params)
    randaugment_apply(out, img, params)


len_ops = len(RA_OPS)  # a module constant, as Numba needs it inside randaugment_params


_entry = dali_entry(randaugment_run, 3)  # the DALI operator's entry point
