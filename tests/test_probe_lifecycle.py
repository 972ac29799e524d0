"""Cases found by probing the run lifecycle (docs/robustness.md) beyond tests/test_lifecycle.py: each
one broke before its fix. Function-level tests are fast; the ones through the real command are slow."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ensiam_fast import checkpoint, runlock, train
from ensiam_fast.config import load_config
from ensiam_fast.errors import ConfigError
from ensiam_fast.stopping import Interrupted, StopRequest

TINY = [
    "batch_size=8", "epochs=2", "log_every=1", "checkpoint_every=1000", "knn_every=0", "knn_k=5",
    "eval_batch_size=16", "data.image_size=16", "data.num_threads=1", "model.proj_hidden=32",
    "model.proj_dim=32", "model.pred_hidden=8", "model.channels_last=false",
    "model.cifar_stem=true", "optim.warmup_epochs=1", "mixed_precision=no", "log_with=none",
]  # fmt: skip


def argv(out, data, *extra):
    return ["--config", "demo", f"output_dir={out}", f"data.root={data}", *TINY, *extra]


def test_a_signal_while_a_checkpoint_is_read_is_not_a_damaged_checkpoint(tmp_path, monkeypatch):
    """``read_checkpoint`` turns any failure of torch.load into "cannot read checkpoint"; a signal
    arriving there (the start checks are abortable) must stay a signal, not make the newest checkpoint
    "damaged" (skipped for an older one, or "none of the checkpoint files can be read", exit 2)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "step-00000001.pt").write_bytes(b"whatever")

    def signalled(*args, **kwargs):
        raise Interrupted(signal.SIGTERM, detail="during the start checks")

    monkeypatch.setattr(torch, "load", signalled)
    with pytest.raises(Interrupted):
        checkpoint.latest_checkpoint(tmp_path)
    assert not isinstance(Interrupted(signal.SIGTERM, detail=""), Exception)


# the real trainer, with torch.load announcing itself and then taking its time: a SIGTERM lands there
SLOW_LOAD = textwrap.dedent(
    """
    import sys, time, torch
    from ensiam_fast import train
    load = torch.load
    def slow_load(*args, **kwargs):
        print("LOADING", file=sys.stderr, flush=True)
        time.sleep(120)
        return load(*args, **kwargs)
    torch.load = slow_load
    sys.exit(train.main(sys.argv[1:]))
    """
)


def wait_for(child, marker: str) -> list[str]:
    lines, deadline = [], time.time() + 300
    while time.time() < deadline:
        line = child.stderr.readline()
        lines.append(line)
        if not line or marker in line:  # the progress bar's \r-separated text may precede it
            break
    assert marker in lines[-1], "".join(lines)
    return lines


@pytest.mark.slow
def test_sigterm_while_resume_reads_the_checkpoint(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    assert train.main(argv(out, tiny_dataset, "max_steps=1")) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    cmd = [sys.executable, "-c", SLOW_LOAD, *argv(out, tiny_dataset, "max_steps=2")]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = wait_for(child, "LOADING")
        child.send_signal(signal.SIGTERM)
        _, rest = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    err = "".join(lines) + rest
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM during the start checks" in err, err
    assert "error:" not in err and "damaged" not in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert not (out / ".lock").exists()
    # the same command again resumes from step 1 and finishes
    assert train.main(argv(out, tiny_dataset, "max_steps=2")) == 0
    assert checkpoint.latest_checkpoint(out)[1]["step"] == 2
    assert os.listdir(out / "checkpoints")


def test_a_second_signal_is_an_interrupt_with_the_signal_number():
    """A second signal stopped with a bare ``KeyboardInterrupt``: a traceback and exit 130 for SIGTERM
    instead of one line and 143. The handler is called directly: no handler is installed."""
    stop = StopRequest()
    with stop.deferred():
        stop._handler(signal.SIGTERM, None)  # the first: a flag only
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as caught:
            stop._handler(signal.SIGTERM, None)
    assert caught.value.signum == signal.SIGTERM
    assert "a second time" in str(caught.value)


# the real trainer, with torch.save announcing itself and then taking its time: two SIGTERMs land in a save
SLOW_SAVE = textwrap.dedent(
    """
    import sys, time, torch
    from ensiam_fast import train
    save = torch.save
    def slow_save(*args, **kwargs):
        print("SAVING", file=sys.stderr, flush=True)
        time.sleep(120)
        return save(*args, **kwargs)
    torch.save = slow_save
    sys.exit(train.main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_sigterm_twice_during_a_checkpoint_write(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    # the torch loader (both runs: it is in the resume fingerprint): the save is the point, and a DALI
    # child compiles DALI's Numba operators again (about 14 s CPU)
    torch_loader = "data.backend=torch"
    cmd = [sys.executable, "-c", SLOW_SAVE, *argv(out, tiny_dataset, "max_steps=3", "checkpoint_every=1", torch_loader)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = wait_for(child, "SAVING")
        child.send_signal(signal.SIGTERM)  # deferred: the save goes on
        time.sleep(1.0)
        assert child.poll() is None
        child.send_signal(signal.SIGTERM)  # the second: at once
        _, rest = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    err = "".join(lines) + rest
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "stopped by SIGTERM a second time" in err, err
    assert os.listdir(out / "checkpoints") == []  # the cut write left no temporary and no checkpoint
    assert not (out / ".lock").exists()
    assert train.main(argv(out, tiny_dataset, "max_steps=3", "checkpoint_every=1", torch_loader)) == 0
    assert checkpoint.latest_checkpoint(out)[1]["step"] == 3


def test_writing_into_a_runs_checkpoints_folder_takes_the_runs_lock(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    lock = runlock.owning(run / "checkpoints")
    assert isinstance(lock, runlock.RunLock) and lock.out == run
    plain = tmp_path / "elsewhere" / "exports"  # not a run directory: nothing to lock
    plain.mkdir(parents=True)
    assert not isinstance(runlock.owning(plain), runlock.RunLock)


HOLD_LOCK = "import sys, time; from ensiam_fast.runlock import RunLock; RunLock(sys.argv[1]).acquire(); " \
    "print('HELD', flush=True); time.sleep(300)"  # fmt: skip


@pytest.mark.slow
def test_export_into_a_locked_runs_checkpoints_folder_is_refused(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    assert train.main(argv(out, tiny_dataset, "max_steps=1")) == 0
    before = sorted(os.listdir(out / "checkpoints"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        target = out / "checkpoints" / "model.safetensors"
        cmd = [sys.executable, "-m", "ensiam_fast.export", "--run", str(out), "--format", "timm", "--out", str(target)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2, done.stderr
    assert [ln for ln in done.stderr.splitlines() if ln.startswith("error:")] == [
        ln for ln in done.stderr.splitlines() if "is in use by PID" in ln
    ], done.stderr
    assert f"is in use by PID {holder.pid}" in done.stderr, done.stderr
    assert sorted(os.listdir(out / "checkpoints")) == before


def test_compare_does_not_wait_on_a_fifo_marker(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import compare
    finally:
        sys.path.pop(0)
    os.mkfifo(tmp_path / compare.MARKER)
    assert compare.read_marker(tmp_path) is None  # before the fix: blocked in read_text() forever


def test_a_released_lock_removes_the_parents_it_created(tmp_path):
    """output_dir=NEW/a/b: the lock made NEW, NEW/a and NEW/a/b; a refused run must leave none of them
    (it left NEW/a), and never a folder that holds something else."""
    lock = runlock.RunLock(tmp_path / "new" / "a" / "b").acquire()
    lock.release()
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()
    lock = runlock.RunLock(tmp_path / "kept" / "a" / "b").acquire()
    (tmp_path / "kept" / "a" / "note.txt").write_text("someone else's")
    lock.release()
    assert sorted(os.listdir(tmp_path / "kept" / "a")) == ["note.txt"]


@pytest.mark.slow
def test_a_refused_run_in_a_new_nested_output_dir_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "a" / "b"
    cmd = [sys.executable, "-m", "ensiam_fast.train", *argv(out, tmp_path / "no-such-dataset")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("error:") == 1, done.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "override", ["seed=[1", "seed=@x", "seed=!!python/name:os.system", "data.preset_overrides={a: 1"]
)
def test_an_override_that_is_not_yaml_is_one_config_error(override):
    with pytest.raises(ConfigError) as caught:
        load_config("demo", [override])
    message = str(caught.value)
    assert "\n" not in message and override.split("=")[0] in message, message


@pytest.mark.parametrize(
    "text",
    [
        b"batch_size: 8\n---\nbatch_size: 9\n",
        b"batch_size: 8\n\tseed: 1\n",
        b"\xff\xfe bad",
        b"a: !!python/name:os.system\n",
    ],
)
def test_a_config_file_that_is_not_yaml_is_one_line(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), [])
    assert "\n" not in str(caught.value) and str(path) in str(caught.value), str(caught.value)


@pytest.mark.slow
def test_a_bad_override_through_the_trainer_is_one_error_line(tmp_path):
    cmd = [sys.executable, "-m", "ensiam_fast.train", "--config", "demo", f"output_dir={tmp_path / 'run'}", "seed=[1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: config key 'seed'"), done.stderr
    assert not (tmp_path / "run").exists()


def test_a_compare_report_skips_a_fifo_marker(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import compare_report
    finally:
        sys.path.pop(0)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    os.mkfifo(tmp_path / "runs" / "a" / "compare.json")
    assert compare_report.read_results(tmp_path) == []  # before the fix: blocked in read_text() forever
