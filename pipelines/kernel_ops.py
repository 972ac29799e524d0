"""The CPU kernels of ``pipelines.kernels`` as DALI operators: the graph side of the kernels.

``numba_function`` makes (once per process) and shares every DALI ``numba_function`` operator of the
project (these per-view stages, and the fused stages of ``pipelines.fused``); the ``*_stage``
functions put one kernel per view in a graph, each drawing its own randomness from a few uniforms
DALI generates, so the pipeline needs no conditionals. DALI calls a compiled CPU function once per
sample from its own worker threads (no Python, no GIL), so it parallelises like any DALI CPU
operator. Per-stage costs: ``tools/bench_stages.py``.
"""

from __future__ import annotations

import threading

import numpy as np
from nvidia.dali import fn, types

from pipelines.kernels import blur as k_blur
from pipelines.kernels import colour as k_colour
from pipelines.kernels import crop as k_crop
from pipelines.kernels import jigsaw as k_jigsaw
from pipelines.kernels import layout as k_layout
from pipelines.kernels import randaugment as k_randaugment
from pipelines.kernels.common import same_shape_as_first
from pipelines.presets import check_jigsaw

_LOCK = threading.Lock()
_OPS: dict[object, object] = {}


def plain(fn_):
    """Keep DALI's AutoGraph (pipelines with conditionals) from rewriting ``fn_`` and the functions it
    defines: Numba must compile the setup and run functions as written."""
    try:
        from nvidia.dali.pipeline import do_not_convert
    except ImportError:
        return fn_
    return do_not_convert(fn_)


def numba_function(key, *, cls=None, **kwargs):
    """One DALI ``NumbaFunction(**kwargs)`` (or ``cls``) per ``key`` and process, shared by every view
    and pipeline, called through a lock: the loader defines the next epoch's pipeline in a background
    thread while another definition may be under way, and one operator object serves both."""
    with _LOCK:
        if key not in _OPS:
            if cls is None:
                from nvidia.dali.plugin.numba import NumbaFunction as cls
            op = cls(**kwargs)
            # DALI records an operator's defining stack frame only when its (process-wide) origin
            # tracing is on at construction, but reads it whenever tracing is on at a call. This
            # object is shared by every later pipeline: built while a definition had tracing off
            # (``pipelines.dali.origin_traces_off``), a later definition with tracing on would fail
            # with AttributeError. None is what DALI itself stores when tracing is on.
            if not hasattr(op, "_definition_frame_end"):
                op._definition_frame_end = None
            _OPS[key] = op
        op = _OPS[key]

    def call(*inputs):
        with _LOCK:
            return op(*inputs)

    return call


def numba_op(name: str, run_fn, setup_fn=None, n_params: int = 2, layout: str = "HWC"):
    """``run_fn(out, img, draws, consts)`` as a DALI CPU operator (uint8 HWC in and out). ``setup_fn``
    gives the output shapes (default: the input's), ``n_params`` the float vectors after the image
    (0 for ``run_fn(out, img)``), ``layout`` the output's."""
    op = numba_function(name, run_fn=run_fn, setup_fn=setup_fn or same_shape_as_first,
                        in_types=[types.UINT8] + [types.FLOAT] * n_params, ins_ndim=[3] + [1] * n_params,
                        out_types=[types.UINT8], outs_ndim=[3])  # fmt: skip

    def call(*inputs):
        return fn.reshape(op(*inputs), layout=layout)  # numba_function outputs carry no layout

    return call


def run_kernel(op, images, num_draws: int, consts):
    """One kernel operator over every view: ``num_draws`` uniforms in [0, 1) per view (its
    randomness) and the preset's constants."""
    draws = fn.random.uniform(range=[0.0, 1.0], shape=[num_draws])
    return op(images, draws, types.Constant(np.float32(consts)))


def colour_stage(images, preset):
    """The colour stage of every view as its kernel (a copy for the views that draw no change)."""
    if not k_colour.has_colour(preset):
        return images
    return run_kernel(numba_op("colour", k_colour._entry), images, k_colour.N_DRAWS, k_colour.colour_constants(preset))


def blur_stage(images, preset):
    """The blur stage of every view as its kernel: the views that draw a blur (p=blur_p) get
    torchvision's 2 * ceil(3 sigma) + 1 tap Gaussian, the others a copy."""
    if preset.blur_p <= 0:
        return images
    return run_kernel(numba_op("blur", k_blur._entry), images, k_blur.BLUR_DRAWS, k_blur.blur_constants(preset))


def randaugment_stage(images, preset):
    """RandAugment(n, m) of every view as its kernel: torchvision's 14 operations with its uint8
    arithmetic (nearest interpolation, black fill)."""
    if preset.randaugment_n <= 0:
        return images
    n_draws = k_randaugment.RA_DRAWS_PER_OP * preset.randaugment_n
    return run_kernel(numba_op("randaugment", k_randaugment._entry), images, n_draws,
                      k_randaugment.randaugment_constants(preset))  # fmt: skip


def jigsaw_stage(images, preset, size: int):
    """The jigsaw of every view as its kernel."""
    check_jigsaw(size, preset.jigsaw_grid)
    grid = preset.jigsaw_grid
    op = numba_op("jigsaw", k_jigsaw._entry)
    return run_kernel(op, images, k_jigsaw.jigsaw_draws(grid), k_jigsaw.jigsaw_constants(preset))


def chw_stage(images):
    """Every view from HWC to CHW (``kernels.layout``)."""
    return numba_op("chw", k_layout._entry, setup_fn=k_layout.chw_shape, n_params=0, layout="CHW")(images)


@plain
def _crop_setup(size: int):
    """Numba setup function: every output is size x size x 3 (``size`` a compile-time constant)."""

    def setup(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0] = size
            outs[0][i][1] = size
            outs[0][i][2] = 3

    return setup


def draw_window(images, preset):
    """Per view, a random resized crop window, (top, left) and (height, width) as int32: the draw
    ``fn.random_resized_crop`` makes (``fn.random_crop_generator``). The one draw of both crop paths
    (the crop kernel and DALI's resampling, ``dali_ops.crop_flip``)."""
    return fn.random_crop_generator(
        images.shape()[0:2], random_area=list(preset.crop_scale), random_aspect_ratio=list(preset.crop_ratio)
    )


def crop_windows(images, preset, flip: bool):
    """Per view, the crop kernel's window vector: a random resized crop window of the image, and the
    mirror flag (probability ``preset.flip_p`` when ``flip``, else 0)."""
    anchor, extent = draw_window(images, preset)
    coin = fn.random.coin_flip(probability=preset.flip_p if flip else 0.0, dtype=types.INT32, shape=[1])
    return fn.cast(fn.cat(anchor, extent, coin), dtype=types.FLOAT)  # few operators: at 32x32 each counts


def crop_resample(images, window, size: int):
    """Every view's window (``crop_windows``) resized to size x size, mirrored where flagged."""
    return numba_op(f"crop{size}", k_crop._entry, setup_fn=_crop_setup(size), n_params=1)(images, window)


def crop_stage(images, preset, size: int, flip: bool):
    """The random resized crop of every view as the crop kernel (torchvision's resampling), mirrored
    with probability ``preset.flip_p`` when ``flip`` (the flip stage follows the crop)."""
    return crop_resample(images, crop_windows(images, preset, flip), size)


__all__ = [
    "blur_stage",
    "chw_stage",
    "colour_stage",
    "crop_resample",
    "crop_stage",
    "crop_windows",
    "draw_window",
    "jigsaw_stage",
    "numba_function",
    "numba_op",
    "plain",
    "randaugment_stage",
    "run_kernel",
]
