"""The colour stage of a view (colour jitter, then grayscale) as one CPU kernel, with torchvision's
semantics: ``RandomApply([ColorJitter(b, c, s, h)], p=jitter_p)`` then ``RandomGrayscale(grayscale_p)``.

A jittered view draws its four factors uniformly from the preset's ranges (hue as a fraction of
the colour circle) and applies brightness, contrast, saturation and hue in a uniformly random order
drawn per view, each operation torchvision's on uint8 (``colour_maths``): computed in float32,
clamped to [0, 255] and truncated back to uint8 after every operation. The hue shift is the HSV
one. A disabled factor (0 in the preset) is skipped, as torchvision skips it.
"""

from __future__ import annotations

import numpy as np

from pipelines.kernels.colour_maths import blend_to, grey_to, hue_shift_to, mean_grey, saturate_to
from pipelines.kernels.common import copy_image, dali_entry, jit

# Layout of the per-preset constant vector handed to the kernel (see ``colour_constants``):
# jitter_p, grayscale_p, then per operation (brightness, contrast, saturation, hue) lo, hi, on.
_P_JITTER, _P_GREY, _OPS = 0, 1, 2
# Uniform [0, 1) draws per view: apply jitter, the 4 factors, 4 order keys, apply grey.
_D_APPLY, _D_FACTOR, _D_ORDER, _D_GREY = 0, 1, 5, 9
N_DRAWS = 10


def factor_ranges(preset) -> list[tuple[float, float, bool]]:
    """(lo, hi, enabled) of brightness, contrast, saturation and hue, as torchvision's ColorJitter
    derives them from single numbers."""
    out = []
    for value in (preset.brightness, preset.contrast, preset.saturation):
        out.append((max(0.0, 1.0 - value), 1.0 + value, value > 0))
    out.append((-preset.hue, preset.hue, preset.hue > 0))
    return out


def colour_constants(preset) -> np.ndarray:
    """The constants of one preset: the two probabilities and the four factor ranges."""
    consts = [preset.jitter_p, preset.grayscale_p]
    for lo, hi, on in factor_ranges(preset):
        consts += [lo, hi, 1.0 if on else 0.0]
    return np.float32(consts)


def has_colour(preset) -> bool:
    """Whether the colour stage can change a view at all."""
    jitter = preset.jitter_p > 0 and any(on for _, _, on in factor_ranges(preset))
    return jitter or preset.grayscale_p > 0


@jit
def _apply(op, f, dst, src):
    """Operation ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue, 4 grey) with factor ``f``,
    from ``src`` into a different array ``dst``."""
    if op == 0:  # brightness: a blend with black
        blend_to(dst, src, np.zeros((1, 1), dtype=np.float32), np.float64(f))
    elif op == 1:  # contrast: a blend with the mean grey
        blend_to(dst, src, mean_grey(src), np.float64(f))
    elif op == 2:  # saturation: a blend with each pixel's grey
        saturate_to(dst, src, np.float64(f))
    elif op == 3:
        hue_shift_to(dst, src, f)
    else:
        grey_to(dst, src)


# The per-view parameter vector (``colour_params``): the number of operations, then (op, factor)
# for each of at most five (four jitter operations in their drawn order, then grey).
N_PARAMS = 11


@jit
def colour_params(draws, consts, params):
    """The operations one view applies, drawn from ``draws`` (N_DRAWS uniforms in [0, 1)) and the
    preset's ``consts`` (``colour_constants``): ``params`` = [n, op_0, factor_0, ..., op_4,
    factor_4], op 0 brightness, 1 contrast, 2 saturation, 3 hue, 4 grey."""
    for i in range(N_PARAMS):
        params[i] = 0.0
    n = 0
    if draws[_D_APPLY] < consts[_P_JITTER]:
        order = np.argsort(draws[_D_ORDER : _D_ORDER + 4])  # a uniformly random permutation
        for k in range(4):
            op = order[k]
            lo = consts[_OPS + 3 * op]
            hi = consts[_OPS + 3 * op + 1]
            if consts[_OPS + 3 * op + 2] == 0.0:
                continue
            f = np.float32(lo + draws[_D_FACTOR + op] * (hi - lo))
            if op == 3 and f == 0.0:  # torchvision returns the image unchanged at hue 0
                continue
            params[1 + 2 * n] = op
            params[2 + 2 * n] = f
            n += 1
    if draws[_D_GREY] < consts[_P_GREY]:
        params[1 + 2 * n] = 4
        n += 1
    params[0] = n


@jit
def colour_apply(out, img, params):
    """One view: ``out`` (H, W, 3) uint8 = the operations of ``params`` (``colour_params``) applied
    to ``img`` (H, W, 3) uint8. Each operation reads one array and writes another (``img`` -> ``out``
    <-> a scratch view): the compiler vectorises a loop only where its input and output do not
    overlap."""
    n = int(params[0])
    if n == 0:
        copy_image(out, img)
        return
    _apply(int(params[1]), np.float32(params[2]), out, img)
    scratch = np.empty(out.shape, dtype=np.uint8)  # (not touched when n == 1)
    for k in range(1, n):
        op = int(params[1 + 2 * k])
        f = np.float32(params[2 + 2 * k])
        if k % 2 == 1:
            _apply(op, f, scratch, out)
        else:
            _apply(op, f, out, scratch)
    if n % 2 == 0:  # the last operation wrote the scratch view
        copy_image(out, scratch)


@jit
def colour_run(out, img, draws, consts):
    """One view: ``out`` (H, W, 3) uint8 = the colour stage applied to ``img`` (H, W, 3) uint8.
    ``draws``: N_DRAWS uniforms in [0, 1) for this view; ``consts``: ``colour_constants``."""
    params = np.empty(N_PARAMS, dtype=np.float32)
    colour_params(draws, consts, params)
    colour_apply(out, img, params)


_entry = dali_entry(colour_run, 3)  # the DALI operator's entry point


__all__ = [
    "N_DRAWS",
    "N_PARAMS",
    "colour_apply",
    "colour_constants",
    "colour_params",
    "colour_run",
    "factor_ranges",
    "has_colour",
]
