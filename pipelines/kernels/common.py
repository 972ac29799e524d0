"""What every CPU kernel shares: the Numba decorator, the untouched-view copy, the output shape, the
entry point DALI compiles."""

from __future__ import annotations

try:  # the helpers the kernels call must be compiled functions; DALI compiles only the entry points
    from numba import njit as _njit
except Exception:  # no usable Numba: kernels.backend() says 'dali' and nothing here runs compiled
    _njit = None


def jit(fn):
    """Compile with Numba, cached on disk when the cache can be written (next to this file, or
    Numba's per-user cache directory), so only the first process pays the compile time. Without
    Numba the plain Python function is returned (nothing calls it then)."""
    if _njit is None:
        return fn
    try:
        return _njit(cache=True)(fn)
    except Exception:  # no writable cache location: compile in every process
        return _njit(fn)


def jit_ieee(fn):
    """``jit`` with IEEE division (Numba's ``error_model="numpy"``): no zero-divisor check, whose
    branch keeps a loop from being vectorised. Only for kernels whose divisors are never zero (a
    zero would give inf or nan instead of raising)."""
    if _njit is None:
        return fn
    try:
        return _njit(cache=True, error_model="numpy")(fn)
    except Exception:
        return _njit(error_model="numpy")(fn)


@jit
def copy_image(dst, src):
    """dst[...] = src for two C-contiguous HWC uint8 images, as one flat (vectorised) loop; Numba's
    3-D slice assignment is much slower."""
    n = src.size
    d = dst.reshape(n)
    s = src.reshape(n)
    for i in range(n):
        d[i] = s[i]


def dali_entry(run, n_inputs: int):
    """The plain function DALI's ``numba_function`` compiles (in every process) for the compiled
    kernel ``run(out, *inputs)`` of ``n_inputs`` (1 to 3) inputs: one call into Numba's cache."""
    if n_inputs == 1:

        def entry(out, a):
            run(out, a)

    elif n_inputs == 2:

        def entry(out, a, b):
            run(out, a, b)

    else:

        def entry(out, a, b, c):
            run(out, a, b, c)

    return entry


def same_shape_as_first(outs, ins):
    """Numba setup function: output 0 has the shape of input 0 (an HWC image), per sample."""
    for i in range(len(outs[0])):
        for d in range(3):
            outs[0][i][d] = ins[0][i][d]
