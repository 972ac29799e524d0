"""The GPU graph of the K views: each stage one operator per iteration, whatever K.

After the crop (one resampling per view, DALI's on the GPU, the crop kernel on the CPU) the K
views of an image are stacked as frames of one sample, (K, S, S, 3), and every later stage --
colour (jitter + grey), blur, RandAugment with the jigsaw (one stage: ``FUSED``) -- is one
``numba_function`` over all frames: a CUDA kernel on the GPU (``pipelines.kernels.cuda``,
``blocks = (K, 1, 1)``), the CPU kernels frame by frame on the CPU (``pipelines.kernels.frames``:
the CPU proxy of the GPU graph, ``data.cpu_kernels=gpu_graph``). The random parameters of a stage
are drawn once per sample for all K views, (K, D) uniforms, turned into (K, P) parameters by one
CPU kernel (the CPU kernels' ``*_params``) and moved to the GPU. One transpose makes the frames CHW
and K slices hand the views out. Operator counts and memory: ``tools/bench_gpu_graph.py``.

Without a usable CUDA device (this is how the graph is traced and counted on a CPU-only machine) a
GPU stage is a trace-only ``NumbaFunction``: the same operator in the graph, with no compiled kernel
(building such a pipeline fails, as any GPU pipeline does there).
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types

from pipelines import dali_ops as ops
from pipelines.kernel_ops import crop_stage, numba_function, plain
from pipelines.kernels import frames as F
from pipelines.kernels.common import dali_entry

_entry = plain(dali_entry)  # (built while a graph is defined: AutoGraph must leave it alone)

# The preset stages each fused operator runs: RandAugment and the jigsaw are one operator (one
# output frame per view, one scratch frame on the GPU: ``kernels.frames.RA_JIGSAW``).
FUSED = {"colour": "colour", "blur": "blur", "randaugment": F.RA_JIGSAW, "jigsaw": F.RA_JIGSAW}
FUSED_STAGES = tuple(dict.fromkeys(FUSED.values()))


def fused_stages(preset) -> list[str]:
    """The fused operators of ``preset`` after the crop, in order (each once)."""
    return list(dict.fromkeys(FUSED[name] for name in preset.stages if name in FUSED))


@plain
def _setup_like_first(outs, ins):
    """Every output has the shape of input 0 (the frames), per sample."""
    for o in range(len(outs)):
        for i in range(len(outs[o])):
            for d in range(4):
                outs[o][i][d] = ins[0][i][d]


@plain
def _setup_params(views: int, n_params: int):
    """Output 0 is (views, n_params) per sample (compile-time constants)."""

    def setup(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0] = views
            outs[0][i][1] = n_params

    return setup


def cuda_usable() -> bool:
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # no driver, no toolkit
        return False


@plain
def _trace_only_class():
    from nvidia.dali.plugin.numba import NumbaFunction

    class TraceOnlyNumbaFunction(NumbaFunction):
        """A GPU ``NumbaFunction`` as it stands in the graph, without compiling its kernel (DALI
        compiles a GPU kernel for the current device when the operator is made)."""

        def __init__(self, run_fn, out_types, in_types, outs_ndim, ins_ndim, setup_fn=None, device="gpu",
                     batch_processing=False, blocks=None, threads_per_block=None, **kwargs):  # fmt: skip
            super(NumbaFunction, self).__init__(device=device, **kwargs)
            self.run_fn = 0
            self.setup_fn = self._get_setup_fn_cpu(setup_fn)
            self.out_types, self.in_types = list(out_types), list(in_types)
            self.outs_ndim, self.ins_ndim = list(outs_ndim), list(ins_ndim)
            self.num_outputs = len(self.out_types)
            self.batch_processing = batch_processing
            self._preserve = True
            self.blocks, self.threads_per_block = blocks, threads_per_block

    return TraceOnlyNumbaFunction


def _numba_function(key: tuple, **kwargs):
    """``kernel_ops.numba_function``; a GPU operator without a usable CUDA device is trace-only."""
    if kwargs.get("device") != "gpu":
        return numba_function(key, **kwargs)
    if not cuda_usable():
        return numba_function(key, cls=_trace_only_class(), **kwargs)
    try:
        return numba_function(key, **kwargs)
    except (RuntimeError, AssertionError) as e:  # DALI's own checks of the CUDA toolkit, Numba and driver
        raise RuntimeError(
            f"the GPU graph's CUDA stages need DALI's numba_function on the GPU, which refused: {e} (DALI's "
            f"numba_function supports the CUDA toolkits its wheel names; set data.device=cpu to augment on the CPU)"
        ) from e


def stage_params(name: str, preset, size: int, views: int, device: str):
    """Stage ``name``'s (K, P) float32 parameters for every sample: one draw, one CPU kernel."""
    n_draws, n_params, consts = F.plan(name, preset, size)
    key = ("params", name, views, n_params, n_draws)
    op = _numba_function(key, run_fn=_entry(F.PARAMS[name], 2), setup_fn=_setup_params(views, n_params),
                         out_types=[types.FLOAT], in_types=[types.FLOAT, types.FLOAT], outs_ndim=[2],
                         ins_ndim=[2, 1], device="cpu")  # fmt: skip
    draws = fn.random.uniform(range=[0.0, 1.0], shape=[views, n_draws])
    params = op(draws, types.Constant(np.float32(consts)))
    return params.gpu() if device == "gpu" else params


def stage(frames, name: str, preset, size: int, views: int, device: str):
    """Stage ``name`` of every frame (K views of each sample) as one operator."""
    params = stage_params(name, preset, size, views, device)
    if device == "gpu":
        from pipelines.kernels import cuda as C

        n_out = C.OUTPUTS[name]
        op = _numba_function(("cuda", name, views), run_fn=C.source(name), setup_fn=_setup_like_first,
                             out_types=[types.UINT8] * n_out, in_types=[types.UINT8, types.FLOAT],
                             outs_ndim=[4] * n_out, ins_ndim=[4, 2], device="gpu", blocks=[views, 1, 1],
                             threads_per_block=[C.THREADS, 1, 1])  # fmt: skip
        out = op(frames, params)
        return out[0] if n_out > 1 else out
    op = _numba_function(("cpu", name), run_fn=_entry(F.APPLY[name], 2), setup_fn=_setup_like_first,
                         out_types=[types.UINT8], in_types=[types.UINT8, types.FLOAT], outs_ndim=[4],
                         ins_ndim=[4, 2], device="cpu")  # fmt: skip
    return op(frames, params)


def crop_views(images, preset, size: int, views: int, device: str, flip: bool) -> list:
    """The K crops (each with the flip when ``flip``) of every image: DALI's resampling on the GPU,
    the crop kernel on the CPU; without a random crop, one resize + centre crop, flipped per view."""
    if not preset.crop:
        fixed = ops.crop(images, preset, size)
        return [ops.flip(fixed, preset.flip_p) if flip else fixed for _ in range(views)]
    if device == "gpu":
        if flip:
            return [ops.crop_flip(images, preset, size) for _ in range(views)]
        return [ops.crop(images, preset, size) for _ in range(views)]
    return [crop_stage(images, preset, size, flip=flip) for _ in range(views)]


def fused_views(images, preset, size: int, views: int, device: str) -> list:
    """K views (uint8 CHW) of every decoded image: the crops, then each later stage of the preset
    as one operator over the K frames."""
    crops = crop_views(images, preset, size, views, device, "flip" in preset.stages)
    names = fused_stages(preset)
    if not names:  # crop (and flip) only: nothing to fuse
        return [ops.to_chw(view) for view in crops]
    frames = fn.stack(*crops, axis=0, axis_name="F")
    for name in names:
        frames = stage(frames, name, preset, size, views, device)
    chw = fn.transpose(frames, perm=[0, 3, 1, 2], output_layout="FCHW")
    return [chw[k] for k in range(views)]


__all__ = ["FUSED", "FUSED_STAGES", "crop_views", "cuda_usable", "fused_stages", "fused_views", "stage", "stage_params"]
