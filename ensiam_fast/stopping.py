"""Stopping a run cleanly on SIGTERM/SIGINT, from the first start check to the last byte written.

One ``StopRequest`` covers the whole run. What a signal does depends on the phase it arrives in:

- an *abortable* phase (the start checks, a kNN evaluation) ends at once: ``Interrupted`` is raised
  where the program is, nothing half-written is left (every file goes through the one writer, whose
  temporary is removed), and what is on disk is the newest state;
- a *deferred* phase (a training step, a checkpoint being written, the curves) runs to its end: the
  signal becomes a flag that the loop checks at the next step boundary (it then checkpoints) or that
  is checked right after the write.

A second signal stops at once (``Interrupted``, exit 128 + N as for the first) in any phase."""

from __future__ import annotations

import contextlib
import signal
import threading

import torch

from ensiam_fast.errors import TrainingError


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; ``str(e)`` says in which phase and what is saved.

    A ``BaseException`` (like ``KeyboardInterrupt``), not an ``Exception``: code that turns any failure
    into its own error (a checkpoint that does not load is "damaged", a DALI failure is a shard error)
    must not turn a signal into an error message and exit code 2."""

    def __init__(self, signum: int, step: int | None = None, detail: str | None = None):
        name = signal.Signals(signum).name
        self.signum, self.step = signum, step
        if detail is None:
            detail = f"at step {step}; a checkpoint was written. Run the same command again to resume."
        super().__init__(f"stopped by {name} {detail}")


SECOND_SIGNAL = (
    "a second time, at once: the newest complete checkpoint on disk is kept (a write that was cut "
    "short left nothing). Run the same command again to resume."
)


class StopRequest:
    """Turns SIGTERM/SIGINT (a cluster's pre-emption, Ctrl-C) into an exception at once in an abortable
    phase, or into a flag the loop checks between steps (see the module's docstring)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        # what an abortable phase says when a signal ends it (None: the phase is deferred)
        self._abort_detail: str | None = "during the start checks; nothing was written. Run the same command again."

    def _handler(self, signum, frame):
        if self.signum is not None:  # a second signal: stop at once (the writer removes its temporary)
            raise Interrupted(signum, detail=SECOND_SIGNAL)
        self.signum = signum
        if self._abort_detail is not None:
            raise Interrupted(signum, detail=self._abort_detail)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    @contextlib.contextmanager
    def abortable(self, detail: str):
        """A signal in this block ends it at once with ``Interrupted(detail)``."""
        previous, self._abort_detail = self._abort_detail, detail
        try:
            self.raise_if_signalled()
            yield
        finally:
            self._abort_detail = previous

    @contextlib.contextmanager
    def deferred(self):
        """A signal in this block only sets the flag; the block runs to its end."""
        previous, self._abort_detail = self._abort_detail, None
        try:
            yield
        finally:
            self._abort_detail = previous

    def raise_if_signalled(self, detail: str | None = None) -> None:
        """After a deferred phase: a signal that arrived during it ends the run now."""
        if self.signum is not None:
            raise Interrupted(self.signum, detail=detail or self._abort_detail or "")

    def agreed(self, accelerator) -> bool:
        """True on every process once any of them was signalled (a collective: call it on all)."""
        flag = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def first_non_finite(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer (BatchNorm statistics too) holding inf or NaN; None when
    every one is finite. Checked before every checkpoint and kNN evaluation: nothing non-finite is saved."""
    named = [(n, t) for n, t in module.state_dict().items() if t.is_floating_point()]
    if not named:
        return None
    ok = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()  # one device sync
    return None if all(ok) else named[ok.index(False)][0]


def non_finite_stop(what: str, since: int, step: int, checkpoints) -> TrainingError:
    """The one stop for a diverged run (a non-finite loss, parameter or buffer): the newest checkpoint
    on disk is from before it."""
    return TrainingError(
        f"{what} between steps {since} and {step}; stopping. The newest checkpoint in {checkpoints} is from "
        "before it (nothing non-finite is saved). Lower optim.base_lr or try mixed_precision=no."
    )
