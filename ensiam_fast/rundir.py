"""A run directory's files: the one way to write a file, the one way to read one from a run
directory, and the storage check at start (the lock that gives a run directory one owner: runlock.py).

Writing (``atomic_write``, ``write_bytes``, ``write_text``): the temporary file is created
``O_CREAT|O_EXCL|O_NOFOLLOW`` with a unique name in the target's own directory, written, fsynced and
renamed over the target, so a reader sees the old file or the new one, never half of one. The target
must be a regular file or absent: a symbolic link, FIFO, socket, device or directory there is refused,
naming it (nothing is written through a planted link). The temporary file is removed on any failure;
a full or read-only disk or an I/O error (ENOSPC, EDQUOT, EROFS, EIO) becomes a ``StorageError`` (a
user error: one line, exit 2). ``open_append`` is the one appender (metrics.jsonl): the existing file
is opened ``O_APPEND|O_NOFOLLOW|O_NONBLOCK`` and must be a regular file.

Reading (``open_regular``): ``O_NOFOLLOW|O_NONBLOCK``, then ``fstat``: only a regular file is read; a
FIFO is never waited on.

Links in the parent directories of a path are followed: the user names the directory (a run directory
may be a link to a larger disk); the rule is about the file this project creates or replaces.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from pathlib import Path

from ensiam_fast.errors import UserError

# the errors a disk gives rather than a bug: a user error naming the path, not a traceback
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}
TMP_PREFIX = "."
TMP_SUFFIX = ".tmp"


class RunDirError(UserError):
    """A path that cannot be written or read as the run needs (a link, a FIFO, a directory, a file
    where a directory goes); the message names it."""


class StorageError(RunDirError):
    """The disk refused a write (full, read-only, an I/O error); ``errno`` says which."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


def describe_errno(e: OSError) -> str:
    return os.strerror(e.errno).lower() if e.errno else str(e)


def kind_of(mode: int) -> str:
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISDIR, "a directory"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))  # fmt: skip
    for test, name in kinds:
        if test(mode):
            return name
    return "not a regular file"


def check_target(path: Path) -> bool:
    """True when ``path`` is a regular file, False when absent; anything else is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise RunDirError(f"cannot write {path}: a folder on its path is a file") from None
    if not stat.S_ISREG(st.st_mode):
        raise RunDirError(
            f"{path} is {kind_of(st.st_mode)}; refusing to write there (nothing was written): remove it or "
            "choose another path"
        )
    return True


def storage_error(e: OSError, what: str) -> UserError | OSError:
    """``e`` as a user error when the disk caused it, else ``e`` itself (a bug: a traceback)."""
    if e.errno in STORAGE_ERRNOS:
        return StorageError(f"could not write {what}: {describe_errno(e)}", e.errno)
    if e.errno == errno.ELOOP:
        return RunDirError(f"could not write {what}: a symbolic link is in the way")
    return e


class _Recording:
    """A file object that remembers the first OSError of a write: a library that turns it into its own
    exception (torch.save's RuntimeError on a full disk) cannot hide it."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", what: str | None = None, buffering: int = -1):
    """``with atomic_write(path) as f: f.write(...)``: the file appears complete at ``path`` on a clean
    exit, and not at all (the previous one untouched, no temporary left) on any failure."""
    path, what = Path(path), what or str(path)
    check_target(path)
    tmp = _tmp_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise RunDirError(f"could not write {what}: the folder {path.parent} does not exist") from e
        if e.errno == errno.ENOTDIR:
            raise RunDirError(f"could not write {what}: {path.parent} is not a directory") from e
        raise storage_error(e, what) from e
    recording = None
    try:
        with os.fdopen(fd, mode, buffering=buffering) as f:
            recording = _Recording(f)
            yield recording
            f.flush()
            os.fsync(f.fileno())
        check_target(path)  # again just before the rename: a link planted meanwhile is refused too
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = recording.error if recording is not None and recording.error is not None else e
        if isinstance(cause, OSError):
            converted = storage_error(cause, what)
            if converted is not cause:
                raise converted from e
            if cause is not e:
                raise cause from e
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """The rename itself on disk (best effort: some filesystems cannot fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes, what: str | None = None) -> None:
    with atomic_write(path, "wb", what) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, what: str | None = None) -> None:
    with atomic_write(path, "w", what) as f:
        f.write(text)


def open_append(path: str | os.PathLike, what: str | None = None):
    """A text file opened for appending: created when absent, refused when not a regular file."""
    path = Path(path)
    check_target(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # a link or a FIFO planted after the check
            raise RunDirError(f"{path} is not a regular file; refusing to write there") from e
        raise storage_error(e, what or str(path)) from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what_it_is = "not a regular file" if not stat.S_ISREG(st.st_mode) else "a hard link to another file"
        raise RunDirError(f"{path} is {what_it_is}; refusing to write there: remove it")
    return os.fdopen(fd, "a")


def open_regular(path: str | os.PathLike, mode: str = "rb"):
    """A file opened for reading only when it is a regular file (never through a final link, never
    waiting on a FIFO); ``RunDirError`` naming what it is otherwise."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunDirError(f"{path} is a symbolic link; not reading it") from e
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RunDirError(f"{path} is {kind_of(st.st_mode)}; not reading it")
    return os.fdopen(fd, mode)


def is_regular(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_folder(path: Path) -> None:
    """A folder this project creates (``checkpoints/``) must be a real directory or absent: a link or
    file planted there is refused, naming it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"{path} is {kind_of(st.st_mode)}, not a directory; refusing to write there: remove it")


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the writer's temporary files left by a process that died mid-write (only the owner of
    the run directory calls this)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX) and p.name.endswith(TMP_SUFFIX))
    stale += sorted(folder.glob("*.pt.tmp"))  # the name used before this writer
    for p in stale:
        if is_regular(p):
            p.unlink(missing_ok=True)
    return stale


# ---------------------------------------------------------------------------------------------
# the storage check


def check_storage(out: Path, need_bytes: int = 0) -> list[str]:
    """Before data or model are built: ``out`` is (or can be made) a writable directory. Returns the
    warnings (too little free space for ``need_bytes``)."""
    try:
        st = os.stat(out)
    except FileNotFoundError:
        st = None
    except NotADirectoryError as e:
        raise RunDirError(f"output_dir={out}: a parent of it is a file, not a directory; choose another") from e
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"output_dir={out} is {kind_of(st.st_mode)}, not a directory; choose another output_dir")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(f"output_dir={out}: {probe} is a file, not a directory; choose another output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(
            f"output_dir={out} is not writable ({probe}: permission denied or a read-only file system); "
            "choose another output_dir"
        )
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise RunDirError(f"output_dir={out} is on a read-only file system; choose another output_dir")
    warnings = []
    free = shutil.disk_usage(probe).free
    if need_bytes and free < need_bytes:
        warnings.append(
            f"{probe} has {free / 2**20:.0f} MiB free but two checkpoints need about {need_bytes / 2**20:.0f} MiB "
            f"({(need_bytes - free) / 2**20:.0f} MiB missing): a save may fail with a full disk"
        )
    return warnings
