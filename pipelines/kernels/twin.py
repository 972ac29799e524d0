"""One source for the maths of the CPU and the CUDA kernels: functions compiled twice.

``@twin`` compiles a plain Python function with ``numba.njit`` (cached on disk, IEEE division as
on a GPU: ``common.jit_ieee``, so a twin's divisors must never be zero) and returns that CPU
function; ``cuda_version(f)`` compiles the *same source* as a
CUDA device function the first time a CUDA kernel needs it (so a CPU-only process never imports
``numba.cuda``). The CUDA copy sees the module's globals with every twin it calls replaced by that
twin's CUDA copy, so a twin may call other twins (and ``fmul``) and both targets run the same
statements. ``@device`` registers a CUDA-only helper of the kernels the same way.

``fmul(a, b)``: a float32 product that is rounded on its own. NVVM fuses a multiply and a
following add into one FMA (one rounding) by default, which LLVM does not do on the CPU; products
that feed a sum go through ``fmul``, which is ``__fmul_rn`` (never fused) on a GPU, so both
targets round the same way. Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) every CUDA
function runs as Python on NumPy scalars, where ``fmul`` is the plain product.

The float32 discipline the twins keep: every constant and every operand typed as ``np.float32``
(Numba promotes float32 with a Python float to float64, NumPy does not); products of two float32
taken in float64 when they are summed there (exact in float64, so fused or not is the same).
"""

from __future__ import annotations

import os
import types

from pipelines.kernels.common import jit_ieee

_SOURCES: dict[int, object] = {}  # id(CPU dispatcher) -> the Python function it was compiled from
_CUDA: dict[int, object] = {}  # id(CPU dispatcher) -> its CUDA device function, once built
_KEEP: list = []  # the CPU dispatchers (their ids stay valid)


def twin(fn):
    """``fn`` compiled for the CPU (``common.jit_ieee``); its CUDA copy comes from ``cuda_version``."""
    cpu = jit_ieee(fn)
    _SOURCES[id(cpu)] = fn
    _KEEP.append(cpu)
    return cpu


def device(fn):
    """``fn`` as a CUDA device function only (a kernel's helper that uses ``cuda.threadIdx``,
    shared memory or ``cuda.syncthreads``): the plain function is returned, and kernels and twins
    that name it call its CUDA copy (``cuda_version``). Nothing compiles it for the CPU."""
    _SOURCES[id(fn)] = fn
    _KEEP.append(fn)
    return fn


def simulated() -> bool:
    """Whether numba.cuda is Numba's CUDA simulator in this process (decided when it is imported)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def cuda_globals(fn) -> dict:
    """``fn``'s globals with every twin it names replaced by the twin's CUDA device function."""
    table = dict(fn.__globals__)
    for name in fn.__code__.co_names:
        value = table.get(name)
        if value is not None and id(value) in _SOURCES:
            table[name] = cuda_version(value)
    return table


def rebind(fn):
    """A copy of the Python function ``fn`` whose global names resolve to CUDA twins (for a CUDA
    kernel body: DALI's numba_function and ``cuda.jit`` compile it from this copy)."""
    return types.FunctionType(fn.__code__, cuda_globals(fn), fn.__name__, fn.__defaults__, fn.__closure__)


def cuda_version(cpu):
    """The CUDA device function compiled from the same source as the twin ``cpu``."""
    key = id(cpu)
    if key not in _CUDA:
        from numba import cuda

        source = _SOURCES[key]
        if source is _fmul_source and not simulated():
            from numba.cuda import libdevice

            _CUDA[key] = libdevice.fmul_rn
        else:
            _CUDA[key] = cuda.jit(device=True)(rebind(source))
    return _CUDA[key]


def _fmul_source(a, b):
    return a * b


fmul = twin(_fmul_source)

__all__ = ["cuda_version", "device", "fmul", "rebind", "simulated", "twin"]
