"""Stopping a run cleanly on SIGTERM/SIGINT: the signal becomes a flag, the loop checkpoints at the
next step boundary and raises ``Interrupted``."""

from __future__ import annotations

import signal
import threading

import torch


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT arrived: a checkpoint was written at the next step boundary."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class StopRequest:
    """Turns SIGTERM/SIGINT (a cluster's pre-emption, Ctrl-C) into a flag the loop checks between
    steps, so the run ends with a checkpoint instead of losing the work since the last one."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.signum is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def agreed(self, accelerator) -> bool:
        """True on every process once any of them was signalled (a collective: call it on all)."""
        flag = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
