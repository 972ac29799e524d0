"""User errors of a training run: the exception types that end it with one line ``error: ...`` and exit
code 2, the way every process agrees on them, and how that line is printed."""

from __future__ import annotations

import sys
import time

from ensiam_fast import distributed
from ensiam_fast.checkpoint import CheckpointError
from ensiam_fast.config import ConfigError
from ensiam_fast.shards import ShardFormatError


class TrainingError(RuntimeError):
    """A run that cannot start or cannot go on; the message says why and what to do."""


USER_ERRORS = (ConfigError, TrainingError, CheckpointError, ShardFormatError, distributed.DistributedError)


def agreed(accelerator, check, *args, also: tuple = ()):
    """``check(*args)`` on every process; a user error on any of them stops all, with one message."""
    try:
        result, error = check(*args), None
    except USER_ERRORS + also as e:
        result, error = None, str(e)
    distributed.raise_if_any(accelerator, error)
    return result


def report(message: str, shared: bool) -> None:
    """One line on stderr: by the first process for an error every process shares, else by each
    process that hit it (naming its rank when there are several)."""
    rank, world = distributed.global_rank(), distributed.requested_world_size()
    if shared and rank != 0:
        return
    prefix = f"rank {rank}: " if world > 1 and not shared else ""
    print(f"error: {prefix}{message}", file=sys.stderr, flush=True)


# how long the other processes wait before reporting an error the first process may share (see report_first)
FIRST_REPORT_GRACE_S = 5.0


def report_first(message: str) -> None:
    """One line for an error found before the processes talk to each other (every process parses the
    same command line and reads the same files, so each usually finds the same error). The first
    process prints it at once; the others wait, because a launcher stops every process as soon as one
    exits: when the error was shared they are stopped without a word. One still running after the
    wait found an error of its own, and prints it naming its rank."""
    if distributed.global_rank() != 0:
        time.sleep(FIRST_REPORT_GRACE_S)
    report(message, shared=distributed.global_rank() == 0)
