"""The run directory's owner (ensiam_fast/rundir.py, ensiam_fast/runlock.py): the one writer, the regular-file
reader, the lock and the storage check, each at function level (the end-to-end cases are in test_lifecycle.py)."""

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ensiam_fast import rundir
from ensiam_fast.checkpoint import latest_checkpoint, save_checkpoint
from ensiam_fast.errors import UserError
from ensiam_fast.rundir import (
    RunDirError,
    StorageError,
    atomic_write,
    check_storage,
    open_append,
    open_regular,
    write_text,
)
from ensiam_fast.runlock import RunLock


def _state(step):
    return {"step": step, "epoch": 0, "batch_in_epoch": step, "config": {}, "model": {"w": torch.full((2,), step)}}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@contextlib.contextmanager
def small_filesystem(tmp_path: Path, size: str = "256k", read_only: bool = False):
    """A tmpfs of ``size`` (read-only when asked) where this process may mount one (root), else None."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                                           capture_output=True).returncode:  # fmt: skip
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# the writer


def test_writer_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two" and leftovers(tmp_path) == []


@pytest.mark.parametrize("planted", ["symlink", "fifo", "directory"])
def test_writer_refuses_a_planted_target_and_leaves_the_victim(tmp_path, planted):
    victim = tmp_path / "private.txt"
    victim.write_text("secret")
    victim.chmod(0o600)
    target = tmp_path / "out.pth"
    if planted == "symlink":
        target.symlink_to(victim)
    elif planted == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    with pytest.raises(RunDirError, match=str(target)) as e:
        write_text(target, "weights")  # a FIFO must not block: the check uses lstat, never open
    assert {"symlink": "symbolic link", "fifo": "FIFO", "directory": "directory"}[planted] in str(e.value)
    assert victim.read_text() == "secret" and (victim.stat().st_mode & 0o777) == 0o600
    assert leftovers(tmp_path) == []


def test_a_planted_temporary_name_is_never_written_through(tmp_path, monkeypatch):
    """The temporary is O_CREAT|O_EXCL|O_NOFOLLOW under a fresh name: a link planted at the name the
    writer draws makes the write fail (the victim untouched), it never follows it."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "r18.pth"
    planted = rundir._tmp_name(target)
    planted.symlink_to(victim)
    monkeypatch.setattr(rundir, "_tmp_name", lambda path: planted)
    with pytest.raises(OSError):
        write_text(target, "x" * 100)
    assert victim.read_text() == "keep" and not target.exists()


def test_a_failure_mid_write_removes_the_temporary_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_enospc_inside_a_library_is_one_user_error(tmp_path, monkeypatch):
    """torch.save turns a failed write into its own RuntimeError: the writer still reports the disk."""
    target = tmp_path / "x.pt"

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = rundir._Recording.__init__
    monkeypatch.setattr(rundir._Recording, "__init__", lambda self, f: real(self, Full(f)))
    with pytest.raises(StorageError, match="no space left on device"):
        with atomic_write(target) as f:
            torch.save({"w": torch.zeros(1000)}, f)
    assert not target.exists() and leftovers(tmp_path) == []


def test_a_full_filesystem_mid_checkpoint_names_the_step_and_the_newest_complete_one(tmp_path, monkeypatch):
    with small_filesystem(tmp_path, "1m") as mnt:
        run = (mnt or tmp_path) / "run"
        save_checkpoint(run, _state(1))
        big = {**_state(2), "model": {"w": torch.zeros(2_000_000)}}  # 8 MB: more than the 1 MiB disk
        if mnt is None:  # no tmpfs here: a writer whose disk is full
            real = rundir._Recording.write

            def full(self, data):
                self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise self.error

            monkeypatch.setattr(rundir._Recording, "write", full)
        with pytest.raises(StorageError) as e:
            save_checkpoint(run, big)
        if mnt is None:
            monkeypatch.setattr(rundir._Recording, "write", real)
        assert str(e.value) == (
            f"could not write checkpoint step 2 to {run}: no space left on device; the newest complete checkpoint is "
            "step 1"
        )
        assert leftovers(run / "checkpoints") == []
        assert latest_checkpoint(run)[1]["step"] == 1


def test_append_refuses_links_and_fifos(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("v")
    (tmp_path / "link.jsonl").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo.jsonl")
    for name in ("link.jsonl", "fifo.jsonl"):
        with pytest.raises(RunDirError, match=name):
            open_append(tmp_path / name)
    assert victim.read_text() == "v"
    with open_append(tmp_path / "m.jsonl") as f:
        f.write("a\n")
    with open_append(tmp_path / "m.jsonl") as f:
        f.write("b\n")
    assert (tmp_path / "m.jsonl").read_text() == "a\nb\n"


def test_reader_never_waits_on_a_fifo(tmp_path):
    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    done = threading.Event()

    def read():
        with contextlib.suppress(RunDirError):
            open_regular(fifo)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(5), "open_regular blocked on a FIFO"
    with pytest.raises(RunDirError, match="FIFO"):
        open_regular(fifo)


def test_a_fifo_named_like_the_newest_checkpoint_is_skipped(tmp_path):
    save_checkpoint(tmp_path, _state(3))
    os.mkfifo(tmp_path / "checkpoints" / "step-99999999.pt")
    with pytest.warns(UserWarning, match="FIFO"):
        path, state = latest_checkpoint(tmp_path)
    assert state["step"] == 3


# ---------------------------------------------------------------------------------------------
# the lock


def test_a_second_owner_is_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        held = json.loads((run / ".lock").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(RunDirError) as e:
            RunLock(run).acquire()  # another open file: flock conflicts even within one process
        assert str(e.value).startswith(f"{run} is in use by PID {os.getpid()} on {socket.gethostname()} since ")
    assert not run.exists()  # the lock made the folder and nothing else went there: removed with it


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "x"}))
    lock = RunLock(run).acquire()
    try:
        assert any(f"PID {int(dead.stdout)}" in n and "no longer running" in n for n in lock.notes)
    finally:
        lock.release()
    assert run.is_dir() and not (run / ".lock").exists()


def test_a_planted_link_as_the_lock_file_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("v")
    (run / ".lock").symlink_to(victim)
    with pytest.raises(RunDirError, match="symbolic link"):
        RunLock(run).acquire()
    assert victim.read_text() == "v"


def test_the_lock_is_held_across_processes(tmp_path):
    run = tmp_path / "run"
    code = "import sys; from ensiam_fast.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('ok')"
    with RunLock(run):
        other = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
    assert other.returncode != 0 and f"in use by PID {os.getpid()}" in other.stderr


FORKING_OWNER = """
import os, sys, time
from ensiam_fast.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
pid = os.fork()
if pid == 0:  # a worker (as a DataLoader's): its clean-up must neither drop the lock nor unlink the file
    lock.release()
    time.sleep(120)
    os._exit(0)
print(pid, flush=True)
time.sleep(120)
"""


def test_a_forked_worker_neither_keeps_nor_drops_its_dead_owners_lock(tmp_path):
    # A flock belongs to the open file, which fork shares: a worker that outlived a SIGKILLed trainer
    # kept the run "in use by PID <the dead trainer>" until it noticed and exited.
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", FORKING_OWNER, str(run)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
    worker = int(proc.stdout.readline())
    try:
        with pytest.raises(RunDirError, match=f"in use by PID {proc.pid} "):  # the worker released nothing
            RunLock(run).acquire()
        assert (run / ".lock").is_file()
        proc.kill()
        proc.wait(timeout=60)
        os.kill(worker, 0)  # the worker still runs ...
        lock = RunLock(run).acquire()  # ... and the dead owner's lock is free at once
        assert any(f"PID {proc.pid} " in n and "no longer running" in n for n in lock.notes), lock.notes
        lock.release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, 9)
        proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# the storage check


def test_storage_check_refuses_a_file_and_a_read_only_directory(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        check_storage(afile)
    with pytest.raises(RunDirError, match="is a file"):
        check_storage(afile / "run")
    with small_filesystem(tmp_path, read_only=True) as mnt:
        if mnt is None and os.geteuid() == 0:
            pytest.skip("root without a read-only mount: permissions do not bind root")
        ro = mnt or tmp_path / "ro"
        if mnt is None:
            ro.mkdir()
            ro.chmod(0o555)
        with pytest.raises(RunDirError, match="not writable|read-only"):
            check_storage(ro / "run")


def test_storage_check_warns_when_two_checkpoints_do_not_fit(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    (warning,) = check_storage(tmp_path / "run", need_bytes=free + 2**40)
    assert "MiB missing" in warning
    assert check_storage(tmp_path / "run", need_bytes=1) == []


def test_every_rundir_error_is_a_user_error():
    assert issubclass(RunDirError, UserError) and issubclass(StorageError, UserError)


def test_a_full_disk_under_metrics_jsonl_is_one_user_error(tmp_path, monkeypatch):
    from ensiam_fast.metrics import MetricsLog

    with small_filesystem(tmp_path, "64k") as mnt:
        folder = mnt or tmp_path
        log = MetricsLog(folder / "metrics.jsonl", True, None)
        if mnt is not None:
            with contextlib.suppress(OSError):
                (folder / "filler").write_bytes(b"x" * 2**20)  # fills the disk
        else:

            def full(path, what=None):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr("ensiam_fast.metrics.open_append", full)
        with pytest.raises(StorageError, match="metrics.jsonl: no space left on device"):
            log.write({"step": 1, "loss": 0.5, "pad": "x" * 8192})


def test_the_non_finite_rule_names_the_first_bad_buffer():
    from ensiam_fast.stopping import first_non_finite

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    assert first_non_finite(net) is None
    net[1].running_var[2] = float("inf")
    assert first_non_finite(net) == "1.running_var"
    net[0].weight.data[0, 0, 0, 0] = float("nan")
    assert first_non_finite(net) == "0.weight"


def test_a_hard_link_planted_as_an_appended_file_or_the_lock_is_refused(tmp_path):
    """Replacing by rename is safe with a hard link (the other name keeps its bytes); appending or
    rewriting in place is not: both refuse a file with another name."""
    victim = tmp_path / "victim"
    victim.write_text("private")
    run = tmp_path / "run"
    run.mkdir()
    os.link(victim, run / "metrics.jsonl")
    with pytest.raises(RunDirError, match="hard link"):
        open_append(run / "metrics.jsonl")
    os.link(victim, run / ".lock")
    with pytest.raises(RunDirError, match="hard link"):
        RunLock(run).acquire()
    os.link(victim, run / "config.yaml")
    write_text(run / "config.yaml", "seed: 0\n")
    assert victim.read_text() == "private" and (run / "config.yaml").read_text() == "seed: 0\n"
