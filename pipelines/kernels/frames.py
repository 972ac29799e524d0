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
from pipelines.kernels.jigsaw import jigsaw_apply, jigsaw_constants, jigsaw_draws, jigsaw_params
from pipelines.kernels.randaugment import (
    RA_DRAWS_PER_OP,
    RA_PARAMS_PER_OP,
    randaugment_apply,
    randaugment_constants,
    randaugment_params,
)


@jit
def colour_params_frames(out, draws, consts):
    for k in range(draws.shape[0]):
        colour_params(draws[k], consts, out[k])


@jit
def blur_params_frames(out, draws, consts):
    for k in range(draws.shape[0]):
        blur_params(draws[k], consts, out[k])


@jit
def randaugment_params_frames(out, draws, consts):
    """consts: ``randaugment_constants`` then the view side."""
    size = int(consts[4])
    for k in range(draws.shape[0]):
        randaugment_params(draws[k], consts, size, size, out[k])


@jit
def jigsaw_params_frames(out, draws, consts):
    for k in range(draws.shape[0]):
        jigsaw_params(draws[k], consts, out[k])


@jit
def colour_frames(out, img, params):
    for k in range(img.shape[0]):
        colour_apply(out[k], img[k], params[k])


@jit
def blur_frames(out, img, params):
    for k in range(img.shape[0]):
        blur_apply(out[k], img[k], params[k])


@jit
def randaugment_frames(out, img, params):
    for k in range(img.shape[0]):
        randaugment_apply(out[k], img[k], params[k])


@jit
def jigsaw_frames(out, img, params):
    grid = int(np.sqrt(np.float32(params.shape[1] - 1)) + np.float32(0.5))
    for k in range(img.shape[0]):
        jigsaw_apply(out[k], img[k], params[k], grid)


def plan(name: str, preset, size: int) -> tuple[int, int, np.ndarray]:
    """(uniforms per view, parameters per view, the preset's constants) of stage ``name``."""
    if name == "colour":
        return N_DRAWS, N_PARAMS, colour_constants(preset)
    if name == "blur":
        return BLUR_DRAWS, blur_params_len(preset), blur_constants(preset)
    if name == "randaugment":
        n = preset.randaugment_n
        consts = np.append(randaugment_constants(preset), np.float32(size))
        return RA_DRAWS_PER_OP * n, RA_PARAMS_PER_OP * n, np.float32(consts)
    if name == "jigsaw":
        grid = preset.jigsaw_grid
        return jigsaw_draws(grid), 1 + grid * grid, jigsaw_constants(preset)
    raise ValueError(f"no fused kernel for stage {name!r}")


PARAMS = {
    "colour": colour_params_frames,
    "blur": blur_params_frames,
    "randaugment": randaugment_params_frames,
    "jigsaw": jigsaw_params_frames,
}
APPLY = {"colour": colour_frames, "blur": blur_frames, "randaugment": randaugment_frames, "jigsaw": jigsaw_frames}


def params(name: str, preset, size: int, draws: np.ndarray) -> np.ndarray:
    """Stage ``name``'s (K, P) float32 parameters from (K, D) uniforms, outside DALI (tests, tools)."""
    _, n_params, consts = plan(name, preset, size)
    out = np.zeros((draws.shape[0], n_params), dtype=np.float32)
    PARAMS[name](out, np.ascontiguousarray(draws, dtype=np.float32), consts)
    return out


__all__ = ["APPLY", "PARAMS", "params", "plan"]
