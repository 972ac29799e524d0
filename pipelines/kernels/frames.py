"""The stages of the GPU graph on the CPU, and the per-view parameters of both.

In the GPU graph (``pipelines.fused``) the K views of an image travel as frames of one sample,
(K, H, W, 3) uint8, and each stage is one operator: a parameter kernel (here, on the CPU) turns the
stage's uniforms (K, D) into per-view parameters (K, P) with the CPU kernels' own ``*_params``
functions, and the stage kernel applies them to every frame: a CUDA kernel on a GPU
(``kernels.cuda``), or, for the CPU proxy of that graph (``data.cpu_kernels=gpu_graph``), the CPU
kernels' ``*_apply`` below, frame by frame. Both give the same bits (``tests/test_cuda_kernels.py``).
"""

from __future__ import annotations

import numpy as np

from pipelines.kernels.blur import BLUR_DRAWS, blur_apply, blur_constants, blur_params, blur_params_len
from pipelines.kernels.colour import N_DRAWS, N_PARAMS, colour_apply, colour_constants, colour_params
from pipelines.kernels.common import jit
from pipelines.kernels.jigsaw import jigsaw_constants, jigsaw_draws, jigsaw_params
from pipelines.kernels.randaugment import (
    RA_DRAWS_PER_OP,
    RA_PARAMS_PER_OP,
    chain_apply,
    randaugment_constants,
    randaugment_params,
)

# The stage after blur: RandAugment then the jigsaw, one operator (either may be off). A view's
# parameters: [n_ops, grid, RA_PARAMS_PER_OP per operation (randaugment_params), then, when grid
# > 0, 1 + grid^2 (jigsaw_params)]; its uniforms: RA_DRAWS_PER_OP per operation, then the
# jigsaw's; its constants: randaugment_constants, the view side, jigsaw_constants (grid 0: none).
RA_JIGSAW = "randaugment_jigsaw"
HEADER = 2


def ra_jigsaw_layout(params_row) -> tuple[int, int, int]:
    """(n_ops, grid, columns the layout needs) of one view's ``randaugment_jigsaw`` parameters."""
    n_ops, grid = int(params_row[0]), int(params_row[1])
    return n_ops, grid, HEADER + RA_PARAMS_PER_OP * n_ops + (1 + grid * grid if grid > 0 else 0)


@jit
def colour_params_frames(out, draws, consts):
    for k in range(draws.shape[0]):
        colour_params(draws[k], consts, out[k])


@jit
def blur_params_frames(out, draws, consts):
    for k in range(draws.shape[0]):
        blur_params(draws[k], consts, out[k])


@jit
def ra_jigsaw_params_frames(out, draws, consts):
    """consts: ``randaugment_constants`` (4), the view side, ``jigsaw_constants`` (4)."""
    n_ops = int(consts[0])
    size = int(consts[4])
    grid = int(consts[5])
    ra_end = HEADER + RA_PARAMS_PER_OP * n_ops
    n_ra_draws = RA_DRAWS_PER_OP * n_ops
    for k in range(draws.shape[0]):
        out[k, 0] = n_ops
        out[k, 1] = grid
        randaugment_params(draws[k, :n_ra_draws], consts[0:4], size, size, out[k, HEADER:ra_end])
        if grid > 0:
            jigsaw_params(draws[k, n_ra_draws:], consts[5:9], out[k, ra_end:])


@jit
def colour_frames(out, img, params):
    for k in range(img.shape[0]):
        colour_apply(out[k], img[k], params[k])


@jit
def blur_frames(out, img, params):
    for k in range(img.shape[0]):
        blur_apply(out[k], img[k], params[k])


@jit
def ra_jigsaw_frames(out, img, params):
    """Each view through ``randaugment.chain_apply``; one scratch frame for all of them."""
    scratch = np.empty(img.shape[1:], dtype=np.uint8)
    for k in range(img.shape[0]):
        p = params[k]
        n_ops = int(p[0])
        grid = int(p[1])
        ra_end = HEADER + RA_PARAMS_PER_OP * n_ops
        chain_apply(out[k], img[k], scratch, p[HEADER:ra_end], p[ra_end:], grid)


def plan(name: str, preset, size: int) -> tuple[int, int, np.ndarray]:
    """(uniforms per view, parameters per view, the preset's constants) of stage ``name``."""
    if name == "colour":
        return N_DRAWS, N_PARAMS, colour_constants(preset)
    if name == "blur":
        return BLUR_DRAWS, blur_params_len(preset), blur_constants(preset)
    if name == RA_JIGSAW:
        n = preset.randaugment_n if "randaugment" in preset.stages else 0
        jig = "jigsaw" in preset.stages
        grid = preset.jigsaw_grid if jig else 0
        jig_consts = jigsaw_constants(preset) if jig else np.zeros(4, np.float32)
        consts = np.concatenate([randaugment_constants(preset), [size], jig_consts])
        consts[0] = n
        n_draws = RA_DRAWS_PER_OP * n + (jigsaw_draws(grid) if jig else 0)
        return n_draws, HEADER + RA_PARAMS_PER_OP * n + (1 + grid * grid if jig else 0), np.float32(consts)
    raise ValueError(f"no fused kernel for stage {name!r}")


PARAMS = {"colour": colour_params_frames, "blur": blur_params_frames, RA_JIGSAW: ra_jigsaw_params_frames}
APPLY = {"colour": colour_frames, "blur": blur_frames, RA_JIGSAW: ra_jigsaw_frames}


def params(name: str, preset, size: int, draws: np.ndarray) -> np.ndarray:
    """Stage ``name``'s (K, P) float32 parameters from (K, D) uniforms, outside DALI (tests, tools)."""
    _, n_params, consts = plan(name, preset, size)
    out = np.zeros((draws.shape[0], n_params), dtype=np.float32)
    PARAMS[name](out, np.ascontiguousarray(draws, dtype=np.float32), consts)
    return out


__all__ = ["APPLY", "HEADER", "PARAMS", "RA_JIGSAW", "params", "plan", "ra_jigsaw_layout"]
