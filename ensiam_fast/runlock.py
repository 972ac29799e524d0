"""A run directory's one owner.

The lock (``RunLock``): ``RUN/.lock`` holds the host, PID and start time of the process that owns the
run directory, and an exclusive ``fcntl.flock`` on it is held for that process's life (the kernel drops
it when the process dies, however it dies). A second process is refused with ``RUN is in use by PID N
on HOST since T``; a lock file left by a process that died (the flock is free) is taken over with a
note. The lock file is removed when its owner ends cleanly.

A forked child (a DataLoader or DALI worker) closes its copy of the lock's descriptor at once: a flock
belongs to the open file, which a fork shares, so a worker that outlives a SIGKILLed owner by a few
seconds would otherwise keep the run "in use" by a dead process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
import weakref
from pathlib import Path

from ensiam_fast.rundir import RunDirError, check_target, describe_errno, storage_error

LOCK_NAME = ".lock"
_HELD: weakref.WeakSet = weakref.WeakSet()  # the locks this process holds


def _forget_in_child() -> None:
    """After a fork, in the child: close the inherited lock descriptors (the parent keeps the lock) and
    forget the locks, so nothing the child runs at its end unlinks the parent's lock file."""
    for lock in list(_HELD):
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None
            lock.created_dir = False
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunLock:
    """The exclusive owner of a run directory (see the module's docstring). ``acquire`` creates the
    directory when needed; ``release`` removes the lock file and, when this lock created the directory
    and nothing else was put there, the directory too (a refused run leaves nothing behind)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.fd: int | None = None
        self.created_dir = False
        self.created: list[Path] = []  # the folders acquire created, deepest first
        self.notes: list[str] = []

    def acquire(self) -> RunLock:
        import fcntl

        if not self.out.exists():
            missing = [self.out, *(p for p in self.out.parents if not p.exists())]  # deepest first
            try:
                self.out.mkdir(parents=True)
                self.created_dir = True
                self.created = missing
            except FileExistsError:
                pass
            except OSError as e:
                raise storage_error(e, f"output_dir={self.out}") from e
        for _ in range(10):  # the file may be removed by its owner between our open and our flock
            check_target(self.path)
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as e:
                raise storage_error(e, f"the lock file {self.path}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirError(f"{self.out} is in use by {holder}; wait for it to end, stop it, or choose "
                                  "another output_dir") from None  # fmt: skip
            except OSError as e:  # a filesystem without locks (some network mounts)
                os.close(fd)
                raise RunDirError(
                    f"cannot lock {self.path} ({describe_errno(e)}): this file system does not support "
                    "locks; put output_dir on a local disk or one that supports flock"
                ) from e
            try:
                st = os.fstat(fd)
                same = st.st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same and (st.st_nlink > 1 or not stat.S_ISREG(st.st_mode)):  # a hard link planted as the lock
                os.close(fd)
                raise RunDirError(f"{self.path} is a hard link to another file or not a regular file; refusing to "
                                  "write there: remove it")  # fmt: skip
            if same:
                break
            os.close(fd)
        else:
            raise RunDirError(f"could not take the lock {self.path}: it keeps changing; is another run starting?")
        self.fd = fd
        _HELD.add(self)
        previous = _read_holder(fd, raw=True)
        if previous:
            self.notes.append(f"note: taking over the lock of {_describe(previous)}, which is no longer running")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as e:
            self.release()
            raise storage_error(e, f"the lock file {self.path}") from e
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before the unlock: a process that opened it sees the change and retries
        os.close(self.fd)  # drops the flock
        self.fd = None
        _HELD.discard(self)
        if self.created_dir:
            for folder in self.created:  # only when empty: a refused run leaves no folder behind,
                try:  # nor the parents it created for output_dir
                    folder.rmdir()
                except OSError:
                    break

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int, raw: bool = False):
    try:
        data = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        record = json.loads(data) if data else None
    except (OSError, ValueError):
        record = {"pid": "?", "host": "?", "since": "?"} if not raw else None
    if raw:
        return record if isinstance(record, dict) else None
    return _describe(record) if isinstance(record, dict) else "another process (its lock file is empty)"


def _describe(record: dict) -> str:
    return f"PID {record.get('pid', '?')} on {record.get('host', '?')} since {record.get('since', '?')}"


def is_run_dir(folder: str | os.PathLike) -> bool:
    """A training run's directory (it holds checkpoints/ or config.yaml)."""
    folder = Path(folder)
    return (folder / "checkpoints").is_dir() or (folder / "config.yaml").is_file()


def owning(folder: str | os.PathLike, main_process: bool = True):
    """The lock of ``folder`` when it is a run directory and this is the main process (evaluation and
    export writing into a run directory), else nothing to hold. ``RUN/checkpoints`` is the run's own
    folder: writing there takes the run's lock too."""
    folder = Path(folder)
    if folder.name == "checkpoints" and is_run_dir(folder.parent):
        folder = folder.parent
    if main_process and is_run_dir(folder):
        return RunLock(folder)
    return contextlib.nullcontext()
