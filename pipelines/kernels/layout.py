"""The last step of every view as a CPU kernel: HWC -> CHW (uint8), the layout views leave the
pipeline in. The same values as DALI's ``fn.transpose``, one pass per channel, about half its CPU
time at 224x224 (``tools/bench_stages.py``, stage ``chw``). (The flip needs no pass of its own: the
crop reads a mirrored view's window right to left, ``kernels.crop``.)"""

from __future__ import annotations

from pipelines.kernels.common import dali_entry, jit


@jit
def chw_run(out, img):
    """``out`` (C, H, W) = ``img`` (H, W, C) transposed; both C-contiguous uint8."""
    h, w, c = img.shape
    n = h * w
    src = img.reshape(n * c)
    for ch in range(c):
        dst = out[ch].reshape(n)
        for px in range(n):
            dst[px] = src[px * c + ch]


def chw_shape(outs, ins):
    """Numba setup function: output 0 is input 0's (H, W, C) as (C, H, W), per sample."""
    for i in range(len(outs[0])):
        outs[0][i][0] = ins[0][i][2]
        outs[0][i][1] = ins[0][i][0]
        outs[0][i][2] = ins[0][i][1]


_entry = dali_entry(chw_run, 1)  # the DALI operator's entry point


__all__ = ["chw_run", "chw_shape"]
