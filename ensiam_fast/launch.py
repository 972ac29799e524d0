"""``accelerate launch`` that keeps the launched processes' exit code and their one-line errors.

    ensiam-launch [accelerate launch options] ensiam_fast/train.py --config demo [key=value ...]
    python -m ensiam_fast.launch --multi_gpu --num_processes 2 -m ensiam_fast.evaluate knn --run DIR

The arguments are exactly ``accelerate launch``'s (its own parser and launchers run them). Why this
exists: whatever a launched process returns, ``accelerate launch`` exits 1 and adds its own report
after the process's output (a ``CalledProcessError`` traceback for one process, torchrun's failure
table for several; ``--quiet`` drops the traceback but keeps the table, and still exits 1). So a bad
setting, which the trainer reports as one line ``error: ...`` with exit code 2, ends with 20 to 40
lines and exit 1. Here the launch is the same, but a failure ends with the process's own output and
its exit code: 2 and nothing more after a user error (the process already printed its line), 128 + N
for a process killed by signal N, and for any other failure one line naming the rank and the code.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys


def failure_exit_code(error: BaseException) -> tuple[int, str] | None:
    """The exit code of the launched process that failed first, and who it was; None when ``error``
    is not a launched process's failure."""
    if isinstance(error, subprocess.CalledProcessError):  # one process (accelerate's simple launcher)
        return error.returncode, "the process"
    try:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except ImportError:  # pragma: no cover - torch always has it
        return None
    if isinstance(error, ChildFailedError) and error.failures:  # several processes (torchrun)
        rank, failure = error.get_first_failure()  # the root cause: the earliest failure
        return failure.exitcode, f"rank {rank} (local rank {failure.local_rank} on {socket.gethostname()})"
    return None


def describe(code: int, who: str) -> str:
    if code < 0:  # killed by a signal (subprocess's and torchrun's convention)
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{who} was killed by {name}"
    return f"{who} exited with code {code}"


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    from ensiam_fast.command import command_name

    parser = launch_command_parser()
    parser.prog = command_name("ensiam-launch")
    args = parser.parse_args(argv)
    # torchrun logs each failed and each stopped process; the process's own output and our one line
    # below say it once (imported first, so the level set here is the one it keeps)
    import torch.distributed.elastic.multiprocessing.api  # noqa: F401

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except Exception as e:
        found = failure_exit_code(e)
        if found is None:
            raise
        code, who = found
        if code == 2:  # a user error: the process printed its `error: ...` line already
            return 2
        print(f"error: {describe(code, who)}; its output is above", file=sys.stderr, flush=True)
        return 128 - code if code < 0 else code
    return 0


if __name__ == "__main__":
    sys.exit(main())
