"""The GPU stages of a view as CUDA kernels: colour (jitter + grey), blur, RandAugment + jigsaw.

Each kernel takes the K views of one image as frames, ``img`` (K, H, W, 3) uint8, and their
parameters, ``params`` (K, P) float32 (drawn on the CPU by ``kernels.frames``: the same
``*_params`` functions as the CPU kernels), and writes ``out`` (K, H, W, 3): one CUDA block per view
(``blocks = (K, 1, 1)``), its threads striding over the view's pixels, ``cuda.syncthreads()``
between the operations of a view and around its reductions (the contrast mean, the autocontrast
range, the equalisation histogram, all in integers, so their order does not matter). RandAugment
and the jigsaw are one kernel: a view's steps alternate between ``out`` and one ``scratch`` frame.
Helpers that only the kernels call are ``twin.device`` functions. The per-value
maths are the CPU kernels' twins (``kernels.twin``): the same source compiled for both targets, so
a view is the CPU kernel's bit for bit (``tests/test_cuda_kernels.py``, under Numba's simulator).

The kernel bodies below are plain Python; ``kernel(name)`` compiles one with ``numba.cuda.jit``
(globals bound to the CUDA twins), ``source(name)`` gives the rebound function DALI's
``numba_function(device="gpu")`` compiles itself. ``launch`` runs a stage on any arrays with
``__cuda_array_interface__`` (torch CUDA tensors), so a GPU machine without DALI can check and time
them (``tools/gpu_suite.py``, step ``cuda_stages``). Importing this module imports ``numba.cuda``.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from pipelines.kernels.blur import blur_value
from pipelines.kernels.colour_maths import blend_value, grey_value, hue_pixel
from pipelines.kernels.cuda_checks import OUTPUTS, check_launch
from pipelines.kernels.frames import HEADER, RA_JIGSAW
from pipelines.kernels.randaugment import (
    RA_PARAMS_PER_OP,
    autocontrast_value,
    equalize_lut,
    sharp_value,
    warp_source,
)
from pipelines.kernels.twin import device, rebind

THREADS = 256  # threads per block (one block per view)


@device
def block_view():
    """(view, thread, threads) of this CUDA thread: one block per view, its threads striding."""
    return cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x


@device
def copy_frame(dst, src, t, nt):
    """dst = src (one view), thread ``t`` of ``nt`` striding over the pixels."""
    w = src.shape[1]
    for px in range(t, src.shape[0] * w, nt):
        i = px // w
        j = px - i * w
        for c in range(3):
            dst[i, j, c] = src[i, j, c]


@device
def block_mean_grey(src, total, t, nt):
    """The mean of the truncated grey of one view (``colour_maths.mean_grey_value``), its sum
    exact in integers in ``total`` (shared, one int64) whatever the threads' order."""
    w = src.shape[1]
    n = src.shape[0] * w
    if t == 0:
        total[0] = 0
    cuda.syncthreads()
    acc = 0
    for px in range(t, n, nt):
        i = px // w
        j = px - i * w
        acc += int(grey_value(src[i, j, 0], src[i, j, 1], src[i, j, 2]))
    cuda.atomic.add(total, 0, acc)
    cuda.syncthreads()
    return np.float32(total[0] / n)


def colour_kernel(out, img, params):
    """``kernels.colour.colour_apply`` of view ``blockIdx.x``, in place in ``out`` after a copy."""
    k, t, nt = block_view()
    dst = out[k]
    p = params[k]
    w = dst.shape[1]
    n = dst.shape[0] * w
    total = cuda.shared.array(1, dtype=np.int64)
    copy_frame(dst, img[k], t, nt)
    cuda.syncthreads()
    for s in range(int(p[0])):
        op = int(p[1 + 2 * s])
        f = p[2 + 2 * s]
        r = np.float32(f)
        q = np.float32(np.float64(1.0) - np.float64(f))
        mean = np.float32(0.0)
        if op == 1:  # contrast: the mean of the truncated grey
            mean = block_mean_grey(dst, total, t, nt)
        for px in range(t, n, nt):
            i = px // w
            j = px - i * w
            a = dst[i, j, 0]
            b = dst[i, j, 1]
            c = dst[i, j, 2]
            if op == 3:
                a, b, c = hue_pixel(a, b, c, r)
            elif op == 4:
                g = np.uint8(grey_value(a, b, c))
                a, b, c = g, g, g
            else:
                o = mean
                if op == 2:
                    o = grey_value(a, b, c)
                a, b, c = blend_value(a, r, q, o), blend_value(b, r, q, o), blend_value(c, r, q, o)
            dst[i, j, 0] = a
            dst[i, j, 1] = b
            dst[i, j, 2] = c
        cuda.syncthreads()


def blur_kernel(out, img, params):
    """``kernels.blur.blur_apply`` of view ``blockIdx.x``: every output value from ``blur_value``."""
    k, t, nt = block_view()
    src = img[k]
    dst = out[k]
    p = params[k]
    h = src.shape[0]
    w = src.shape[1]
    on = p[0] != np.float32(0.0)
    r = int(p[1])
    taps = p[2 : 3 + r]
    rx = min(r, w - 1)
    ry = min(r, h - 1)
    for v in range(t, h * w * 3, nt):
        i = v // (w * 3)
        j = (v // 3) - i * w
        c = v - (v // 3) * 3
        if on:
            dst[i, j, c] = blur_value(src, i, j, c, taps, rx, ry)
        else:
            dst[i, j, c] = src[i, j, c]


@device
def ra_reduce(src, op, total, lohi, hist, lut, t, nt):
    """What RandAugment operation ``op`` needs of the whole view before its pixels: contrast's mean
    grey (returned), autocontrast's channel ranges (``lohi``), equalisation's tables (``lut``)."""
    w = src.shape[1]
    n = src.shape[0] * w
    if op == 8:
        return block_mean_grey(src, total, t, nt)
    if op == 12:  # autocontrast: each channel's range
        for c in range(t, 3, nt):  # (a loop: a block may have fewer than 3 threads)
            lohi[c] = 255
            lohi[3 + c] = 0
        cuda.syncthreads()
        for px in range(t, n, nt):
            i = px // w
            j = px - i * w
            for c in range(3):
                cuda.atomic.min(lohi, c, np.int32(src[i, j, c]))
                cuda.atomic.max(lohi, 3 + c, np.int32(src[i, j, c]))
        cuda.syncthreads()
    elif op == 13:  # equalize: each channel's histogram, then its table
        for v in range(t, 768, nt):
            hist[v] = 0
        cuda.syncthreads()
        for px in range(t, n, nt):
            i = px // w
            j = px - i * w
            for c in range(3):
                cuda.atomic.add(hist, 256 * c + int(src[i, j, c]), 1)
        cuda.syncthreads()
        for c in range(t, 3, nt):
            equalize_lut(hist[256 * c : 256 * (c + 1)], n, lut[256 * c : 256 * (c + 1)])
        cuda.syncthreads()
    return np.float32(0.0)


@device
def ra_pixel(dst, src, i, j, q, mean, lohi, lut):
    """RandAugment operation ``q`` (``ra_op_params``) at output pixel (i, j): ``ra_apply``'s maths."""
    h = src.shape[0]
    w = src.shape[1]
    op = int(q[0])
    if 1 <= op <= 5:
        half_w = np.float32(0.5 * w - 0.5)
        half_h = np.float32(0.5 * h - 0.5)
        iy, ix = warp_source(i, j, half_h, half_w, q[1], q[2], q[3], q[4], q[5], q[6])
        inside = 0 <= ix < w and 0 <= iy < h
        for c in range(3):
            dst[i, j, c] = src[iy, ix, c] if inside else np.uint8(0)
    elif 6 <= op <= 8:
        o = mean
        if op == 7:
            o = grey_value(src[i, j, 0], src[i, j, 1], src[i, j, 2])
        for c in range(3):
            dst[i, j, c] = blend_value(src[i, j, c], q[1], q[2], o)
    elif op == 9:
        border = i == 0 or j == 0 or i == h - 1 or j == w - 1
        for c in range(3):
            if border:
                dst[i, j, c] = src[i, j, c]
            else:
                dst[i, j, c] = sharp_value(
                    src[i - 1, j - 1, c], src[i - 1, j, c], src[i - 1, j + 1, c],
                    src[i, j - 1, c], src[i, j, c], src[i, j + 1, c],
                    src[i + 1, j - 1, c], src[i + 1, j, c], src[i + 1, j + 1, c], q[1],
                )  # fmt: skip
    elif op == 10:
        mask = np.uint8(q[1])
        for c in range(3):
            dst[i, j, c] = src[i, j, c] & mask
    elif op == 11:
        for c in range(3):
            v = src[i, j, c]
            dst[i, j, c] = np.uint8(255) - v if v >= q[1] else v
    elif op == 12:
        for c in range(3):
            lo = lohi[c]
            hi = lohi[3 + c]
            dst[i, j, c] = src[i, j, c] if hi == lo else autocontrast_value(src[i, j, c], lo, hi)
    elif op == 13:
        for c in range(3):
            dst[i, j, c] = np.uint8(lut[256 * c + int(src[i, j, c])])
    else:
        for c in range(3):
            dst[i, j, c] = src[i, j, c]


@device
def jigsaw_pixel(dst, src, i, j, tiles, grid):
    """``kernels.jigsaw.jigsaw_apply`` at output pixel (i, j): ``tiles`` the source tile of each place."""
    th = src.shape[0] // grid
    tw = src.shape[1] // grid
    ti = i // th
    tj = j // tw
    s = int(tiles[ti * grid + tj])
    si = (s // grid) * th + (i - ti * th)
    sj = (s % grid) * tw + (j - tj * tw)
    for c in range(3):
        dst[i, j, c] = src[si, sj, c]


def randaugment_jigsaw_kernel(out, scratch, img, params):
    """``kernels.randaugment.chain_apply`` of view ``blockIdx.x`` (parameters as
    ``kernels.frames.ra_jigsaw_layout``): its RandAugment operations, then its jigsaw, each step from
    one buffer into the other (``img`` -> ... -> ``out``, through ``scratch``)."""
    k, t, nt = block_view()
    w = img.shape[2]
    n = img.shape[1] * w
    hist = cuda.shared.array(768, dtype=np.int32)
    lut = cuda.shared.array(768, dtype=np.int32)
    lohi = cuda.shared.array(6, dtype=np.int32)
    total = cuda.shared.array(1, dtype=np.int64)
    p = params[k]
    n_ops = int(p[0])
    grid = int(p[1])
    ra_end = HEADER + RA_PARAMS_PER_OP * n_ops
    steps = n_ops + (1 if grid > 0 and p[ra_end] != np.float32(0.0) else 0)
    src = img[k]
    if steps == 0:  # nothing to do: a copy, as chain_apply
        copy_frame(out[k], src, t, nt)
    for s in range(steps):
        dst = out[k] if (steps - 1 - s) % 2 == 0 else scratch[k]
        q = p[HEADER + RA_PARAMS_PER_OP * s : HEADER + RA_PARAMS_PER_OP * (s + 1)]
        tiles = p[ra_end + 1 :]
        mean = np.float32(0.0)
        if s < n_ops:
            mean = ra_reduce(src, int(q[0]), total, lohi, hist, lut, t, nt)
        for px in range(t, n, nt):
            i = px // w
            j = px - i * w
            if s < n_ops:
                ra_pixel(dst, src, i, j, q, mean, lohi, lut)
            else:
                jigsaw_pixel(dst, src, i, j, tiles, grid)
        cuda.syncthreads()
        src = dst


BODIES = {"colour": colour_kernel, "blur": blur_kernel, RA_JIGSAW: randaugment_jigsaw_kernel}
_COMPILED: dict[str, object] = {}


def source(name: str):
    """The kernel body of stage ``name`` with its globals bound to the CUDA twins (for DALI)."""
    return rebind(BODIES[name])


def kernel(name: str):
    """Stage ``name``'s CUDA kernel, compiled once per process."""
    if name not in _COMPILED:
        _COMPILED[name] = cuda.jit(source(name))
    return _COMPILED[name]


def launch(name: str, out, img, params, *, scratch=None, threads: int = THREADS, stream=0):
    """Run stage ``name`` on K frames: ``out`` and ``img`` (K, H, W, 3) uint8, ``params`` (K, P)
    float32 (``kernels.frames.params``), all CUDA arrays (``__cuda_array_interface__``: torch CUDA
    tensors) or, under Numba's CUDA simulator, NumPy arrays. RandAugment + jigsaw needs ``scratch``,
    like ``out``. Shapes, element types, the stage's parameters (blur's radii, RandAugment + jigsaw's
    headers, operations and tiles: read back to the host) and ``threads`` (1..1024) are checked first
    (``check_launch``: a ValueError naming the argument)."""
    check_launch(name, out, img, params, scratch, threads)
    views = int(img.shape[0])
    if views == 0:  # a grid of no blocks is an invalid launch on a device (the simulator runs it)
        return
    run = kernel(name)[(views, 1, 1), (threads, 1, 1), stream]
    if OUTPUTS[name] == 2:
        run(out, scratch, img, params)
    else:
        run(out, img, params)


__all__ = ["BODIES", "OUTPUTS", "THREADS", "check_launch", "kernel", "launch", "source"]
