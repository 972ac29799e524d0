"""CPU threads for a fair share of a shared machine: the trainer's torch threads follow the load.

On a CPU that other jobs also use, a fixed thread count fails one way or the other. torch runs each
operator as an OpenMP parallel region whose threads meet at a barrier: when the scheduler parks one
of them for another job, the others spin or wait at the barrier, so with every core's worth of
threads the trainer collapses under background load (the demo fell to 0.21 of its idle rate). One
thread avoids the barriers but leaves cores idle when the machine is free, and OpenMP's passive wait
policy (threads sleep at once) costs a third of the idle rate.

So the trainer chooses at run time. :class:`ThreadGovernor` samples, once a second, how much of the
CPUs this process may use (its affinity set) the rest of the machine keeps busy (``/proc/stat``
minus this process and its children), and sets torch's intra-op threads to the cores left over
(at least 1, at most the process's share). A change is applied on the training thread between
batches (OpenMP thread counts belong to the thread that sets them) and only after two samples
agree, so a brief spike does not flip it. DALI's threads stay as configured (``data.num_threads``;
they block while idle rather than spin) and Numba needs nothing: the CPU kernels are serial, so its
thread pool never starts.

    loader = configure_runtime(loader, device_type="cpu")   # once, in the trainer's set-up

Spin-wait (always on). A thread that reaches a barrier first spins before it sleeps: libgomp's
default is 300,000 spins, long enough that on a loaded machine the waiting threads burn the time
slices the working ones need. libgomp reads the count once, when torch loads it, so importing
``ensiam_fast`` (the trainer's entry points do it before torch) sets ``GOMP_SPINCOUNT=20000``,
unless the user set it or ``OMP_WAIT_POLICY``: a short spin keeps the idle rate and stops most of
the waste under load (docs/benchmarks.md, "Fair share on a shared CPU").

Opt-in: ``ENSIAM_THREADS=auto`` turns the governor on, ``ENSIAM_THREADS=N`` fixes torch's threads
at N, unset leaves torch's default (a changing thread count changes float summation order, so
runs stop matching bit for bit). The governor stops, and torch's thread count is restored, when
the returned loader is collected.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_share(num_local_processes: int = 1) -> int:
    """Cores this process may use: its affinity set divided among the processes on this machine."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, num_local_processes))


def busy_ticks(cpus: set[int], stat: str | None = None) -> int | None:
    """Busy clock ticks (all but idle and iowait) summed over ``cpus``, from ``/proc/stat``."""
    try:
        text = stat if stat is not None else Path("/proc/stat").read_text()
    except OSError:
        return None
    total = 0
    for line in text.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]
            total += sum(values) - values[3] - values[4]  # idle, iowait
    return total


def own_ticks(pid: int | None = None) -> int:
    """User + system clock ticks of this process and its descendants (e.g. data-loader workers)."""
    pid = pid or os.getpid()
    total = 0
    stack, seen = [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def threads_for(others_busy_cores: float, share: int) -> int:
    """torch threads when the rest of the machine keeps ``others_busy_cores`` of our CPUs busy."""
    return int(min(share, max(1, round(share - others_busy_cores))))


class ThreadGovernor:
    """Samples the machine's load in a daemon thread; :meth:`apply` sets the agreed thread count."""

    def __init__(self, share: int, interval: float = 1.0):
        self.share, self.interval = share, interval
        self.cpus = os.sched_getaffinity(0)
        self.target = share
        self.initial = self.applied = torch.get_num_threads()
        self.history: list[tuple[float, float, int]] = []  # (time, others' busy cores, target)
        self._pending: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ensiam-thread-governor", daemon=True)

    def start(self) -> ThreadGovernor:
        self.apply()
        if busy_ticks(self.cpus) is not None:  # no /proc/stat: keep the share
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.applied != self.initial:
            torch.set_num_threads(self.initial)

    def _run(self) -> None:
        last = (time.monotonic(), busy_ticks(self.cpus), own_ticks())
        while not self._stop.wait(self.interval):
            now = (time.monotonic(), busy_ticks(self.cpus), own_ticks())
            elapsed = now[0] - last[0]
            if now[1] is None or elapsed <= 0:
                continue
            self.observe(max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / CLOCK_TICKS / elapsed))
            last = now

    def observe(self, others_busy_cores: float) -> None:
        """One load sample: the target changes once two samples in a row propose the same count."""
        proposal = threads_for(others_busy_cores, self.share)
        if proposal == self._pending:
            self.target = proposal
        self._pending = proposal
        self.history = (self.history + [(time.monotonic(), others_busy_cores, self.target)])[-600:]

    def apply(self) -> None:
        """Call on the training thread: sets torch's threads when the target changed."""
        if self.target != self.applied:
            torch.set_num_threads(self.target)
            self.applied = self.target


class GovernedLoader:
    """The loader with the governor's thread count applied before each batch is handed out."""

    def __init__(self, loader, governor: ThreadGovernor):
        self.loader, self.governor = loader, governor

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        return self.iter_from(0)

    def iter_from(self, start_batch: int, state: dict | None = None) -> Iterator:
        batches = self.loader.iter_from(start_batch, state) if state else self.loader.iter_from(start_batch)
        for item in batches:
            self.governor.apply()
            yield item


def configure_runtime(loader, device_type: str = "cpu", num_local_processes: int | None = None):
    """Choose the trainer's CPU threads from ``ENSIAM_THREADS``; returns the loader to iterate.

    ``ENSIAM_THREADS=auto``: the governor (see the module docstring). ``ENSIAM_THREADS=N``: N threads.
    Unset: torch's default, as before. The governor is opt-in because a thread count that changes
    during a run changes the order of float reductions, so two runs (e.g. one resumed, one not) no
    longer match to the last bits (tests/test_train.py's resume test caught it).
    ``num_local_processes``: training processes on this machine (default: ``LOCAL_WORLD_SIZE``, as
    set by torchrun and ``accelerate launch``, else 1); they split the CPUs evenly."""
    mode = os.environ.get("ENSIAM_THREADS", "").strip().lower()
    if not mode:
        return loader
    share = cpu_share(num_local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if mode != "auto":
        torch.set_num_threads(max(1, int(mode)))
        return loader
    if device_type != "cpu":  # the model runs on the GPU: torch's CPU threads only launch kernels
        torch.set_num_threads(share)
        return loader
    governor = ThreadGovernor(share).start()
    governed = GovernedLoader(loader, governor)
    weakref.finalize(governed, governor.stop)
    return governed
