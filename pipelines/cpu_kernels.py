"""Fused CPU kernels for the DALI pipeline, compiled with Numba and run by DALI's ``numba_function``.

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
        for i in range(n * 3):
            dst[i] = src[i]
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
        for y in range(h):
            d = dst[y]
            s = src[y]
            for j in range(row_len):
                d[j] = s[j]
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


def same_shape_as_first(outs, ins):
    """Numba setup function: output 0 has the shape of input 0 (an HWC image), per sample."""
    for i in range(len(outs[0])):
        for d in range(3):
            outs[0][i][d] = ins[0][i][d]


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
        with _LOCK:
            return op(*inputs)

    return call


def blur_op():
    """The blur kernel as a DALI operator (see ``_numba_op``)."""
    return _numba_op("blur", blur_run)


def colour_op():
    """The colour kernel as a DALI operator (see ``_numba_op``)."""
    return _numba_op("colour", colour_run)


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
    "same_shape_as_first",
]
