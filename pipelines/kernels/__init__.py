"""The augmentation kernels, compiled with Numba: the maths only, no DALI graph.

One module per stage of a view: ``crop`` (the random resized crop with the flip), ``colour``
(jitter + grey), ``blur``, ``randaugment``, ``jigsaw``, ``layout`` (the final HWC -> CHW); the
colour maths they share is ``colour_maths``. Each stage's randomness is a few uniforms per view:
``*_params`` turns them into the view's parameters and ``*_apply`` applies them (``*_run`` does
both, one view). ``twin`` compiles the per-value maths for the CPU and for CUDA; ``cuda`` holds the
GPU graph's CUDA kernels and ``frames`` the same stages over the K views of an image as frames.
The DALI operators that run them: ``pipelines.kernel_ops`` (per view, the CPU pipeline) and
``pipelines.fused`` (one operator per stage for all K views, the GPU graph and its CPU proxy).

Numba caches each compiled kernel on disk keyed on its own source file only: after editing a
shared module (``colour_maths``, ``common``, ``twin``), delete ``pipelines/kernels/__pycache__``
or the stages that import it keep running the old code.
"""

from __future__ import annotations

from pipelines.presets import CPU_KERNELS as CHOICES  # data.cpu_kernels: the table lives with the presets

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


__all__ = ["CHOICES", "backend", "numba_available"]
