"""The jigsaw stage of a view as one CPU kernel: with probability jigsaw_p, the view's grid x grid
tiles are moved, all of them uniformly ('global') or each within its neighbourhood ('local', DCL's
region confusion); see ``pipelines.presets``."""

from __future__ import annotations

import numpy as np

from pipelines.kernels.common import copy_image, dali_entry, jit
from pipelines.presets import JIGSAW_LOCAL_K, JIGSAW_MODES

__all__ = [
    "jigsaw_apply",
    "jigsaw_constants",
    "jigsaw_draws",
    "jigsaw_params",
    "jigsaw_run",
    "tile_sources",
]


def jigsaw_draws(grid: int) -> int:
    """Uniform [0, 1) draws per view: apply, then two keys per tile (rows, then columns)."""
    return 1 + 2 * grid * grid


def jigsaw_constants(preset) -> np.ndarray:
    """(grid, jigsaw_p, local, k) of one preset."""
    local = JIGSAW_MODES.index(preset.jigsaw_mode)
    return np.float32([preset.jigsaw_grid, preset.jigsaw_p, local, JIGSAW_LOCAL_K])


@jit
def tile_sources(grid, draws, local, k):
    """For each output tile (row-major), the source tile it shows."""
    n = grid * grid
    if local == 0:
        return np.argsort(draws[1 : 1 + n])  # the order that sorts n uniform keys: uniform
    src = np.arange(n)
    keys = np.empty(grid, dtype=np.float64)
    for y in range(grid):  # each row: sort x + U(-k, k)
        for x in range(grid):
            keys[x] = x + (2.0 * draws[1 + y * grid + x] - 1.0) * k
        order = np.argsort(keys)
        row = src[y * grid : (y + 1) * grid].copy()
        for x in range(grid):
            src[y * grid + x] = row[order[x]]
    for x in range(grid):  # then each column: sort y + U(-k, k)
        for y in range(grid):
            keys[y] = y + (2.0 * draws[1 + n + x * grid + y] - 1.0) * k
        order = np.argsort(keys)
        col = np.empty(grid, dtype=src.dtype)
        for y in range(grid):
            col[y] = src[y * grid + x]
        for y in range(grid):
            src[y * grid + x] = col[order[y]]
    return src


@jit
def jigsaw_params(draws, consts, params):
    """One view's jigsaw: ``params`` = [apply (0/1), the source tile of each place (row-major)],
    applied when draws[0] < jigsaw_p (``tile_sources``)."""
    grid = int(consts[0])
    n = grid * grid
    for p in range(n):
        params[1 + p] = p
    params[0] = 0.0
    if not draws[0] < consts[1]:
        return
    order = tile_sources(grid, draws, int(consts[2]), np.float64(consts[3]))
    for p in range(n):
        params[1 + p] = order[p]
    params[0] = 1.0


@jit
def jigsaw_apply(out, img, params, grid):
    """One view moved tile by tile (``jigsaw_params``), or copied."""
    if params[0] == 0.0:
        copy_image(out, img)
        return
    h, w, ch = img.shape
    th = h // grid
    tw = w // grid
    src_rows = img.reshape(h, w * ch)
    dst_rows = out.reshape(h, w * ch)
    span = tw * ch
    for p in range(grid * grid):
        t = int(params[1 + p])
        sy = (t // grid) * th
        sx = (t % grid) * span
        dy = (p // grid) * th
        dx = (p % grid) * span
        for i in range(th):
            src = src_rows[sy + i, sx : sx + span]  # contiguous, offset 0: a plain vectorised copy
            dst = dst_rows[dy + i, dx : dx + span]
            for j in range(span):
                dst[j] = src[j]


@jit
def jigsaw_run(out, img, draws, consts):
    """One view, moved tile by tile when draws[0] < jigsaw_p, else copied."""
    grid = int(consts[0])
    params = np.empty(1 + grid * grid, dtype=np.float32)
    jigsaw_params(draws, consts, params)
    jigsaw_apply(out, img, params, grid)


_entry = dali_entry(jigsaw_run, 3)  # the DALI operator's entry point
