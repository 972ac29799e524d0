"""Fused CPU kernels for the DALI pipeline, compiled with Numba and run by DALI's ``numba_function``.

One module per stage of a view: ``crop`` (the random resized crop with the flip), ``colour``
(jitter + grey), ``blur``, ``randaugment``, ``jigsaw``, ``layout`` (the final HWC -> CHW); the
colour maths they share is ``colour_maths``. Each stage is
one call per view that draws its own randomness from a few uniforms DALI generates, so the
pipeline needs no conditionals. Per-stage costs against DALI's operators: ``tools/bench_stages.py``.

DALI calls the compiled function once per sample from its own worker threads (no Python, no
GIL), so it parallelises like any DALI CPU operator. Only the CPU pipeline uses them; the GPU
pipeline uses DALI's operators (``pipelines.dali_ops``).

Numba caches each compiled kernel on disk keyed on its own source file only: after editing a
shared module (``colour_maths``, ``common``), delete ``pipelines/kernels/__pycache__`` or the
stages that import it keep running the old code.
"""

from __future__ import annotations

import threading

import numpy as np

CHOICES = ("auto", "numba", "gpu_graph")

_LOCK = threading.Lock()
_OPS: dict[str, object] = {}
_STATE: dict[str, object] = {}


def numba_available() -> tuple[bool, str]:
    """(whether Numba and DALI's numba_function can be used here, why not)."""
    if "available" not in _STATE:
        try:
            import numba  # noqa: F401
            from nvidia.dali.plugin.numba.experimental import NumbaFunction  # noqa: F401

            _STATE["available"], _STATE["why"] = True, ""
        except Exception as e:  # ImportError, or a Numba that does not match the installed NumPy
            _STATE["available"], _STATE["why"] = False, f"{type(e).__name__}: {e}"
    return bool(_STATE["available"]), str(_STATE["why"])


def backend(choice: str = "auto") -> str:
    """The CPU pipeline's kernels: 'numba' (per-view fused kernels, the default) or 'gpu_graph'
    (the GPU pipeline's graph on the CPU: the K views as frames, one operator per stage,
    ``pipelines.fused``). ``choice`` is the config key ``data.cpu_kernels``; 'auto' is 'numba'.
    Both need Numba (a dependency): without it this fails, naming why."""
    want = str(choice).strip().lower()
    if want not in CHOICES:
        raise ValueError(f"cpu_kernels must be one of {', '.join(CHOICES)}, got {choice!r}")
    ok, why = numba_available()
    if not ok:
        raise RuntimeError(
            f"the DALI pipelines need Numba and DALI's numba_function, which cannot be used here ({why})"
        )
    return "gpu_graph" if want == "gpu_graph" else "numba"


def numba_op(name: str, run_fn, setup_fn=None, n_params: int = 2, layout: str = "HWC"):
    """``run_fn(out, img, draws, consts)`` as a DALI CPU operator (uint8 HWC in and out), compiled
    once per process and shared by every view and pipeline. ``setup_fn`` gives the output shapes
    (default: the input's), ``n_params`` the float vectors after the image (0 for ``run_fn(out,
    img)``), ``layout`` the output's.

    Calls are serialised: the loader defines the next epoch's pipeline in a background thread
    while another definition may be under way, and one operator object serves both.
    """
    with _LOCK:
        if name not in _OPS:
            from nvidia.dali import types
            from nvidia.dali.plugin.numba.experimental import NumbaFunction

            from pipelines.kernels.common import same_shape_as_first

            _OPS[name] = NumbaFunction(
                run_fn=run_fn,
                setup_fn=setup_fn or same_shape_as_first,
                in_types=[types.UINT8] + [types.FLOAT] * n_params,
                ins_ndim=[3] + [1] * n_params,
                out_types=[types.UINT8],
                outs_ndim=[3],
            )
            # DALI records an operator's defining stack frame only when its (process-wide) origin
            # tracing is on at construction, but reads it whenever tracing is on at a call. This
            # object is shared by every later pipeline: built while a definition had tracing off
            # (``pipelines.dali.origin_traces_off``), a later definition with tracing on would fail
            # with AttributeError. None is what DALI itself stores when tracing is on.
            if not hasattr(_OPS[name], "_definition_frame_end"):
                _OPS[name]._definition_frame_end = None
        op = _OPS[name]

    def call(*inputs):
        from nvidia.dali import fn

        with _LOCK:
            out = op(*inputs)
        return fn.reshape(out, layout=layout)  # numba_function outputs carry no layout

    return call


def run_kernel(op, images, num_draws: int, consts):
    """One kernel operator over every view: ``num_draws`` uniforms in [0, 1) per view (its
    randomness) and the preset's constants."""
    from nvidia.dali import fn, types

    draws = fn.random.uniform(range=[0.0, 1.0], shape=[num_draws])
    return op(images, draws, types.Constant(np.float32(consts)))


__all__ = ["CHOICES", "backend", "numba_available", "numba_op", "run_kernel"]
