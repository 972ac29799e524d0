"""Peak memory of a training step, and ``views_per_pass=auto``: the largest chunk that fits.

Peak of a step. CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's own count of
live tensor bytes). CPU: the process's resident set, read from ``/proc/self/statm`` every
millisecond by a sampling thread while the step runs (:class:`RssPeak`); on hosts without
``/proc`` the kernel's high-water mark ``ru_maxrss``. Both are totals of the process (model,
optimizer, activations), so a budget is compared with them directly.

``auto``: on the first batch, trial steps with 1, 2, 4, ... views per pass (each divisor of K,
smallest first: on a CPU freed memory can stay resident, so an ascending order never reads a larger
earlier peak into a smaller trial), stopping at the first that does not fit. A trial runs the real
forward and backward with the BatchNorm running statistics frozen and throws its gradients away, so
the run's state is as before. The optimizer's momentum (one copy of the parameters, created at the
first step) is added to each trial's peak.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable

import torch

from ensiam_fast.batchnorm_ops import freeze_running_stats
from ensiam_fast.methods import SSLMethod, train_views

MARGIN = 0.10  # of a GPU's free memory kept back when no memory_budget_gb is given


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def maxrss_bytes() -> int:
    """The process's resident high-water mark (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


class RssPeak:
    """``with RssPeak() as m: ...`` then ``m.peak``: the largest resident set seen while inside."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            time.sleep(self.interval_s)

    def __enter__(self) -> RssPeak:
        if _rss_bytes() is None:  # no /proc: the kernel's high-water mark, read on exit
            self._thread = None
            return self
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.peak = maxrss_bytes()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


def step_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Run ``fn`` and return the peak memory while it ran (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with RssPeak() as m:
        fn()
    return m.peak


def default_budget(device: torch.device) -> int | None:
    """On a GPU: what torch holds now plus the free memory less the margin; elsewhere none."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return torch.cuda.memory_allocated(device) + int(free * (1 - MARGIN))


def trial_peaks(method: SSLMethod, x: torch.Tensor, autocast=None, budget: int | None = None) -> dict[int, int | None]:
    """Peak bytes of one step per views-per-pass divisor of K, ascending, stopping after the first
    over ``budget`` (None: out of memory). The model's state is left as it was, gradients None."""
    import contextlib

    autocast = autocast or contextlib.nullcontext
    params = [p for p in method.parameters() if p.requires_grad]
    momentum = sum(p.numel() * p.element_size() for p in params)
    had_grad = any(p.grad is not None for p in params)
    if had_grad:
        raise RuntimeError("views_per_pass=auto measures before the first backward; gradients are already set")
    k, peaks = x.shape[0], {}
    for n in [d for d in range(1, k + 1) if k % d == 0]:
        try:
            with freeze_running_stats(method):
                peak = step_peak_bytes(
                    lambda n=n: train_views(method, method, x, n, lambda loss: loss.backward(), autocast), x.device
                )
            peaks[n] = peak + momentum
        except torch.cuda.OutOfMemoryError:
            peaks[n] = None
        finally:
            for p in params:
                p.grad = None
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
        if peaks[n] is None or (budget is not None and peaks[n] > budget):
            break
    return peaks


def choose(peaks: dict[int, int | None], budget: int | None) -> int:
    """The largest measured views per pass whose peak fits (1 when none does)."""
    fits = [n for n, peak in peaks.items() if peak is not None and (budget is None or peak <= budget)]
    return max(fits) if fits else 1


def describe(peaks: dict[int, int | None], budget: int, chosen: int, k: int) -> str:
    shown = ", ".join(f"{n}: {'out of memory' if p is None else f'{p / 2**30:.2f} GB'}" for n, p in peaks.items())
    return (
        f"views_per_pass=auto: {chosen} of {k} views per pass (budget {budget / 2**30:.2f} GB; measured peak "
        f"per views_per_pass {shown})"
    )
