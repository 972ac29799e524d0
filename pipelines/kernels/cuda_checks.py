"""The checks of ``kernels.cuda.launch``: arguments a CUDA kernel would read or write out of bounds
with, or misread, refused in one line (a CUDA kernel checks no index). Split from cuda.py (pure move)."""

from __future__ import annotations

import numbers

import numpy as np
from numba import cuda

from pipelines.kernels.colour import N_PARAMS
from pipelines.kernels.frames import HEADER, RA_JIGSAW, ra_jigsaw_layout
from pipelines.kernels.randaugment import RA_OPS, RA_PARAMS_PER_OP

# outputs of each kernel before its inputs (img, params): RandAugment and jigsaw's scratch frames
OUTPUTS = {"colour": 1, "blur": 1, RA_JIGSAW: 2}


def _dtype(a) -> str:
    """The element type of an array as a NumPy type string ('|u1', '<f4')."""
    iface = getattr(a, "__cuda_array_interface__", None)
    if iface is not None:
        return np.dtype(iface["typestr"]).str
    return np.dtype(a.dtype).str


def check_launch(name: str, out, img, params, scratch, threads: int) -> None:
    """Refuse, in one line, arguments a kernel would read or write out of bounds with (a CUDA
    kernel checks no index) or misread: the checks of ``launch``."""
    if name not in OUTPUTS:
        raise ValueError(f"no CUDA kernel for stage {name!r}: one of {', '.join(OUTPUTS)}")
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
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 1 <= threads <= 1024:
        raise ValueError(f"{name}: threads per block must be in 1..1024, got {threads!r} (an int)")
    arrays = [("img", img), ("params", params)] + frames
    for what, a in arrays:  # NumPy arrays go over as one block: numba refuses strided ones
        if not hasattr(a, "__cuda_array_interface__") and not (a.flags.c_contiguous or a.flags.f_contiguous):
            raise ValueError(f"{name}: {what} must be contiguous (np.ascontiguousarray), got strides {a.strides}")
    for (wa, a), (wb, b) in [(("out", out), ("img", img))] + [
        (x, y) for x in frames[1:] for y in arrays[:1] + frames[:1]
    ]:
        if _overlap(a, b):  # a kernel reads other pixels of its source than the one it writes
            raise ValueError(
                f"{name}: {wa} and {wb} must not share memory (the kernel reads one while writing the other)"
            )
    n_params = pshape[1]
    if name == "colour" and n_params != N_PARAMS:
        raise ValueError(f"colour: params must have {N_PARAMS} columns (colour_params), got {n_params}")
    if name == "blur" and n_params < 3:
        raise ValueError(f"blur: params must have 3 + r columns (blur_params), got {n_params}")
    if name == "blur":  # the kernel reads taps[0..r] of every view it blurs
        radius = _host(params)[:, 1]
        bad = ~((radius >= 0) & (radius <= n_params - 3) & (radius == np.floor(radius)))
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"blur: view {k}'s radius {radius[k]:g} must be a whole number in 0..{n_params - 3}")
    if name == RA_JIGSAW:
        check_ra_jigsaw(_host(params), shape)


def _span(a) -> tuple[int, int]:
    """The first byte of an array's elements and one past its last (CUDA or NumPy array)."""
    iface = getattr(a, "__cuda_array_interface__", None) or np.asarray(a).__array_interface__
    shape = tuple(int(d) for d in iface["shape"])
    item = np.dtype(iface["typestr"]).itemsize
    strides = iface.get("strides") or tuple(int(item * np.prod(shape[i + 1 :])) for i in range(len(shape)))
    start = int(iface["data"][0])
    if 0 in shape:
        return start, start
    lo = start + sum(min(0, (d - 1) * st) for d, st in zip(shape, strides))
    return lo, start + sum(max(0, (d - 1) * st) for d, st in zip(shape, strides)) + item


def _overlap(a, b) -> bool:
    """Whether the bytes two arrays span overlap (same device assumed)."""
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _host(a) -> np.ndarray:
    """A copy of ``a`` in host memory (a CUDA array through ``__cuda_array_interface__``)."""
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a).copy_to_host()
    return np.asarray(a)


def check_ra_jigsaw(params: np.ndarray, shape: tuple) -> None:
    """Every view's ``randaugment_jigsaw`` parameters (``frames.ra_jigsaw_layout``) fit the columns
    and the frame: the kernel reads as many operations and tiles as the header says."""
    n_params = params.shape[1]
    if n_params < HEADER:
        raise ValueError(f"{RA_JIGSAW}: params must start with (n_ops, grid), got {n_params} columns")
    if not np.isfinite(params[:, :HEADER]).all():
        raise ValueError(f"{RA_JIGSAW}: params' header (n_ops, grid) must be finite")
    for k, row in enumerate(params):
        n_ops, grid, need = ra_jigsaw_layout(row)
        if row[0] != n_ops or row[1] != grid or n_ops < 0 or grid < 0 or need != n_params:
            raise ValueError(
                f"{RA_JIGSAW}: view {k}'s header (n_ops={row[0]:g}, grid={row[1]:g}) needs {need} columns (2 + "
                f"{RA_PARAMS_PER_OP} n_ops, + 1 + grid^2 with a jigsaw), got {n_params}"
            )
        ops = row[HEADER : HEADER + RA_PARAMS_PER_OP * n_ops : RA_PARAMS_PER_OP]
        if any(not np.isfinite(op) or op != int(op) or not 0 <= op < len(RA_OPS) for op in ops):
            raise ValueError(f"{RA_JIGSAW}: view {k}'s RandAugment operations must be 0..{len(RA_OPS) - 1}, got {ops}")
        if grid and (shape[1] % grid or shape[2] % grid):
            raise ValueError(f"{RA_JIGSAW}: the jigsaw grid {grid} must divide the frame {shape[1]}x{shape[2]}")
        tiles = row[n_params - grid * grid :] if grid else row[:0]
        if grid and not np.isfinite(tiles).all():
            raise ValueError(f"{RA_JIGSAW}: view {k}'s jigsaw tiles must be finite, got {tiles}")
        if grid and sorted(int(v) for v in tiles) != list(range(grid * grid)):
            raise ValueError(f"{RA_JIGSAW}: view {k}'s jigsaw tiles must be a permutation of 0..{grid * grid - 1}")
