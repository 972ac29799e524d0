"""The jigsaw stage of a view as one CPU kernel."""

from __future__ import annotations

import numpy as np

from pipelines.kernels import numba_op, run_kernel
from pipelines.kernels.common import jit


@jit
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


def _entry(out, img, draws, consts):  # compiled by DALI in every process; one call into the cache
    jigsaw_run(out, img, draws, consts)


def stage(images, grid: int, size: int):
    """The jigsaw of every view as this kernel: a tile permutation drawn per view (the order that
    sorts grid*grid uniform keys), one copy of each tile."""
    from pipelines.dali_ops import check_jigsaw

    check_jigsaw(size, grid)
    return run_kernel(numba_op("jigsaw", _entry), images, grid * grid, [grid])
