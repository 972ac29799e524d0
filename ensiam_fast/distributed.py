"""Processes: how a launch becomes one job, and how its ranks stay in agreement.

``accelerate launch --multi_gpu --num_processes N`` starts N workers through torchrun, which sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. Accelerate forms a process group from them only for a
device it recognises; on a host without CUDA it needs ``cpu=True`` (what ``ACCELERATE_USE_CPU=1``
sets), otherwise every worker becomes an independent single-process run. :func:`build_accelerator`
passes it, so the same command forms one gloo job on a CPU host and one NCCL job on a GPU host.

Every collective has a deadline (``dist_timeout_s``): a peer that died or froze turns into an error
on the other ranks instead of a silent wait. The checks at start (:func:`check_shared_output_dir`,
:func:`agree_on`) make all ranks fail together, with one message, when they would otherwise diverge.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ensiam_fast.errors import UserError
from ensiam_fast.rundir import write_text


class DistributedError(UserError):
    """The ranks disagree or a launch did not form one job; the message says which and what to do.
    ``shared``: every rank raised this same error (so one of them reports it)."""

    def __init__(self, message: str, shared: bool = False):
        super().__init__(message)
        self.shared = shared


def requested_world_size() -> int:
    """Processes the launcher started (torchrun/MPI variables), 1 when none say otherwise."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def global_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def build_accelerator(*, mixed_precision: str, timeout_s: float, **kwargs):
    """An Accelerator whose process group (if any) has a ``timeout_s`` deadline on every collective."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()  # gloo on a CPU host instead of N independent runs
    handler = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=[handler], **kwargs)
    wanted = requested_world_size()
    if wanted != acc.num_processes:
        raise DistributedError(
            f"the launcher started {wanted} processes but they did not form one job "
            f"(this process sees {acc.num_processes}); check the accelerate launch options"
        )
    if acc.num_processes == 1 and "MASTER_PORT" in os.environ and "ACCELERATE_USE_CPU" in os.environ:
        # accelerate's plain launcher sets MASTER_* only when asked for several processes or machines
        print(
            "warning: accelerate launch was asked for several processes but started only this one; add "
            "--multi_gpu (also on a host without GPUs: the processes then use gloo on the CPU)",
            file=sys.stderr,
        )
    return acc


def is_peer_failure(error: BaseException) -> bool:
    """A collective failed because another process died, froze or disconnected."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                            "[gloo]", "NCCL", "Broken pipe", "ProcessGroup")
    )  # fmt: skip


def agree_on(accelerator, what: str, value, *, advice: str) -> None:
    """Every rank must hold the same ``value``; if not, all ranks raise with every rank's value."""
    if accelerator.num_processes == 1:
        return
    values = [None] * accelerator.num_processes
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise DistributedError(f"the processes disagree on {what} ({seen}); {advice}", shared=True)


def raise_if_any(accelerator, error: str | None) -> None:
    """A collective: when any rank found a problem, every rank raises (the same message everywhere)."""
    if accelerator.num_processes == 1:
        if error:
            raise DistributedError(error, shared=True)
        return
    errors = [None] * accelerator.num_processes
    dist.all_gather_object(errors, error)
    found = [(r, e) for r, e in enumerate(errors) if e]
    if found:
        rank, message = found[0]
        every = len(found) == len(errors) and all(e == message for _, e in found)
        raise DistributedError(message if every else f"rank {rank}: {message}", shared=True)


def settle() -> None:
    """Wait until every process got here (after the first one printed a shared error): the launcher
    stops all processes as soon as one exits, which could cut the report off."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer already gone: nothing left to wait for
            pass


def check_shared_output_dir(accelerator, out: Path) -> None:
    """All ranks must see the same ``output_dir`` (shared storage), or they would resume from
    different checkpoints and write over each other. The main process writes a token there; every
    rank must read it back."""
    if accelerator.num_processes == 1:
        return
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    dist.broadcast_object_list(token, src=0)
    probe = out / f".rank-check-{token[0]}"
    created = accelerator.is_main_process and not out.exists()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text(probe, token[0])
    accelerator.wait_for_everyone()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    error = (
        None
        if seen
        else (
            f"output_dir {out} on this process is not the main process's folder: every process must see "
            "the same output_dir (shared storage such as NFS/Lustre) to resume and checkpoint together"
        )
    )
    try:
        raise_if_any(accelerator, error)
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            probe.unlink(missing_ok=True)
            if created:  # the run may still be refused: leave no empty folder behind (made again later)
                out.rmdir()


@torch.no_grad()
def sync_buffers(module: torch.nn.Module, accelerator) -> None:
    """Make every buffer identical on all ranks: floating ones (BatchNorm running statistics, which
    each rank updates from its own batches) are averaged, integer ones (counters) taken from rank 0."""
    if accelerator.num_processes == 1:
        return
    world = accelerator.num_processes
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world)
        else:
            dist.broadcast(buf, src=0)


def agreed(accelerator, check, *args):
    """``check(*args)`` on every process; a user error on any of them stops all, with one message."""
    try:
        result, error = check(*args), None
    except UserError as e:
        result, error = None, str(e)
    raise_if_any(accelerator, error)
    return result


def report(message: str, shared: bool) -> None:
    """One line on stderr: by the first process for an error every process shares, else by each
    process that hit it (naming its rank when there are several)."""
    rank, world = global_rank(), requested_world_size()
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
    if global_rank() != 0:
        time.sleep(FIRST_REPORT_GRACE_S)
    report(message, shared=global_rank() == 0)
