"""The GPU stages of a view as CUDA kernels: colour (jitter + grey), blur, RandAugment, jigsaw.

Each kernel takes the K views of one image as frames, ``img`` (K, H, W, 3) uint8, and their
parameters, ``params`` (K, P) float32 (drawn on the CPU by ``kernels.frames``: the same
``*_params`` functions as the CPU kernels), and writes ``out`` (K, H, W, 3): one CUDA block per view
(``blocks = (K, 1, 1)``), its threads striding over the view's pixels, ``cuda.syncthreads()``
between the operations of a view and around its reductions (the contrast mean, the autocontrast
range, the equalisation histogram, all in integers, so their order does not matter). The per-value
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
from pipelines.kernels.colour import N_PARAMS
from pipelines.kernels.colour_maths import blend_value, grey_value, hue_pixel
from pipelines.kernels.randaugment import (
    RA_PARAMS_PER_OP,
    autocontrast_value,
    equalize_lut,
    sharp_value,
    warp_source,
)
from pipelines.kernels.twin import rebind

THREADS = 256  # threads per block (one block per view)


def colour_kernel(out, img, params):
    """``kernels.colour.colour_apply`` of view ``blockIdx.x``, in place in ``out`` after a copy."""
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    src = img[k]
    dst = out[k]
    p = params[k]
    w = src.shape[1]
    n = src.shape[0] * w
    total = cuda.shared.array(1, dtype=np.int64)
    for px in range(t, n, nt):
        i = px // w
        j = px - i * w
        for c in range(3):
            dst[i, j, c] = src[i, j, c]
    cuda.syncthreads()
    for s in range(int(p[0])):
        op = int(p[1 + 2 * s])
        f = p[2 + 2 * s]
        r = np.float32(f)
        q = np.float32(np.float64(1.0) - np.float64(f))
        mean = np.float32(0.0)
        if op == 1:  # contrast: the mean of the truncated grey, summed exactly
            if t == 0:
                total[0] = 0
            cuda.syncthreads()
            acc = 0
            for px in range(t, n, nt):
                i = px // w
                j = px - i * w
                acc += int(grey_value(dst[i, j, 0], dst[i, j, 1], dst[i, j, 2]))
            cuda.atomic.add(total, 0, acc)
            cuda.syncthreads()
            mean = np.float32(total[0] / n)
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
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
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


def randaugment_kernel(out, scratch, img, params):
    """``kernels.randaugment.randaugment_apply`` of view ``blockIdx.x``: each operation from one
    buffer into the other (``img`` -> ... -> ``out``, through ``scratch``)."""
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    h = img.shape[1]
    w = img.shape[2]
    n = h * w
    hist = cuda.shared.array(768, dtype=np.int32)
    lut = cuda.shared.array(768, dtype=np.int32)
    lohi = cuda.shared.array(6, dtype=np.int32)
    total = cuda.shared.array(1, dtype=np.int64)
    half_w = np.float32(0.5 * w - 0.5)
    half_h = np.float32(0.5 * h - 0.5)
    n_ops = params.shape[1] // RA_PARAMS_PER_OP
    src = img[k]
    if n_ops == 0:  # no operation: a copy, as randaugment_apply
        for px in range(t, n, nt):
            i = px // w
            j = px - i * w
            for c in range(3):
                out[k, i, j, c] = src[i, j, c]
    for s in range(n_ops):
        dst = out[k] if (n_ops - 1 - s) % 2 == 0 else scratch[k]
        q = params[k, RA_PARAMS_PER_OP * s : RA_PARAMS_PER_OP * (s + 1)]
        op = int(q[0])
        mean = np.float32(0.0)
        if op == 8:  # contrast: the mean grey, summed exactly
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
            mean = np.float32(total[0] / n)
        elif op == 12:  # autocontrast: each channel's range
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
        for px in range(t, n, nt):
            i = px // w
            j = px - i * w
            if 1 <= op <= 5:
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
        cuda.syncthreads()
        src = dst


def jigsaw_kernel(out, img, params):
    """``kernels.jigsaw.jigsaw_apply`` of view ``blockIdx.x`` (a grid of sqrt(P - 1) tiles a side)."""
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    src = img[k]
    dst = out[k]
    p = params[k]
    h = src.shape[0]
    w = src.shape[1]
    grid = int(np.sqrt(np.float32(params.shape[1] - 1)) + np.float32(0.5))
    th = h // grid
    tw = w // grid
    on = p[0] != np.float32(0.0)
    for px in range(t, h * w, nt):
        i = px // w
        j = px - i * w
        si = i
        sj = j
        if on:
            ti = i // th
            tj = j // tw
            s = int(p[1 + ti * grid + tj])
            si = (s // grid) * th + (i - ti * th)
            sj = (s % grid) * tw + (j - tj * tw)
        for c in range(3):
            dst[i, j, c] = src[si, sj, c]


BODIES = {
    "colour": colour_kernel,
    "blur": blur_kernel,
    "randaugment": randaugment_kernel,
    "jigsaw": jigsaw_kernel,
}
# outputs of each kernel before its inputs (img, params): RandAugment's scratch frames
OUTPUTS = {"colour": 1, "blur": 1, "randaugment": 2, "jigsaw": 1}
_COMPILED: dict[str, object] = {}


def source(name: str):
    """The kernel body of stage ``name`` with its globals bound to the CUDA twins (for DALI)."""
    return rebind(BODIES[name])


def kernel(name: str):
    """Stage ``name``'s CUDA kernel, compiled once per process."""
    if name not in _COMPILED:
        _COMPILED[name] = cuda.jit(source(name))
    return _COMPILED[name]


def _dtype(a) -> str:
    """The element type of an array as a NumPy type string ('|u1', '<f4')."""
    iface = getattr(a, "__cuda_array_interface__", None)
    if iface is not None:
        return np.dtype(iface["typestr"]).str
    return np.dtype(a.dtype).str


def check_launch(name: str, out, img, params, scratch, threads: int) -> None:
    """Refuse, in one line, arguments a kernel would read or write out of bounds with (a CUDA
    kernel checks no index) or misread: the checks of ``launch``."""
    if name not in BODIES:
        raise ValueError(f"no CUDA kernel for stage {name!r}: one of {', '.join(BODIES)}")
    shape = tuple(int(d) for d in img.shape)
    if len(shape) != 4 or shape[3] != 3 or _dtype(img) != "|u1":
        raise ValueError(f"{name}: img must be (K, H, W, 3) uint8, got {shape} {_dtype(img)}")
    frames = [("out", out)] + ([("scratch", scratch)] if OUTPUTS[name] == 2 else [])
    for what, a in frames:
        if a is None:
            raise ValueError(f"{name}: the kernel needs a {what} array shaped like img {shape}")
        if tuple(int(d) for d in a.shape) != shape or _dtype(a) != "|u1":
            raise ValueError(f"{name}: {what} must be uint8 shaped like img {shape}, got {tuple(a.shape)} {_dtype(a)}")
    pshape = tuple(int(d) for d in params.shape)
    if len(pshape) != 2 or pshape[0] != shape[0] or _dtype(params) != "<f4":
        raise ValueError(f"{name}: params must be ({shape[0]}, P) float32, got {pshape} {_dtype(params)}")
    if not 1 <= int(threads) <= 1024:
        raise ValueError(f"{name}: threads per block must be in 1..1024, got {threads}")
    n_params = pshape[1]
    if name == "colour" and n_params != N_PARAMS:
        raise ValueError(f"colour: params must have {N_PARAMS} columns (colour_params), got {n_params}")
    if name == "blur" and n_params < 3:
        raise ValueError(f"blur: params must have 3 + r columns (blur_params), got {n_params}")
    if name == "randaugment" and n_params % RA_PARAMS_PER_OP:
        raise ValueError(f"randaugment: params must have a multiple of {RA_PARAMS_PER_OP} columns, got {n_params}")
    if name == "jigsaw":
        grid = int(np.sqrt(np.float32(n_params - 1)) + np.float32(0.5)) if n_params > 1 else 0
        if grid < 1 or grid * grid != n_params - 1 or shape[1] % grid or shape[2] % grid:
            raise ValueError(
                f"jigsaw: params must have 1 + grid^2 columns, grid dividing the frame {shape[1]}x{shape[2]}, "
                f"got {n_params} columns"
            )


def launch(name: str, out, img, params, *, scratch=None, threads: int = THREADS, stream=0):
    """Run stage ``name`` on K frames: ``out`` and ``img`` (K, H, W, 3) uint8, ``params`` (K, P)
    float32 (``kernels.frames.params``), all CUDA arrays (``__cuda_array_interface__``: torch CUDA
    tensors) or, under Numba's CUDA simulator, NumPy arrays. RandAugment needs ``scratch``, like
    ``out``. Shapes, element types, the stage's parameter count and ``threads`` (1..1024) are
    checked first (``check_launch``: a ValueError naming the argument)."""
    check_launch(name, out, img, params, scratch, threads)
    views = int(img.shape[0])
    run = kernel(name)[(views, 1, 1), (threads, 1, 1), stream]
    if OUTPUTS[name] == 2:
        run(out, scratch, img, params)
    else:
        run(out, img, params)


__all__ = ["BODIES", "OUTPUTS", "THREADS", "check_launch", "kernel", "launch", "source"]
