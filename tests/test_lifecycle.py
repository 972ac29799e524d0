"""A run's life through the real entry points (train, evaluate, export): one owner per run directory,
links and FIFOs refused at every written path, a signal in each phase, a resume that would change the
math, full and read-only disks, a diverging run. CPU, tiny dataset; slow (many short runs)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset
from test_rundir import small_filesystem

from ensiam_fast import export, loop, rundir, runlock, train
from ensiam_fast.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from ensiam_fast.evaluate import cli as evaluate_cli

pytestmark = pytest.mark.slow

TINY = [
    "batch_size=8", "epochs=2", "log_every=1", "checkpoint_every=1000", "knn_every=1", "knn_k=5",
    "eval_batch_size=16", "data.image_size=16", "data.num_threads=1", "model.proj_hidden=32",
    "model.proj_dim=32", "model.pred_hidden=8", "model.channels_last=false",
    "model.cifar_stem=true", "optim.warmup_epochs=1", "mixed_precision=no", "log_with=none",
]  # fmt: skip


def argv(out, data, *extra):
    return ["--config", "demo", f"output_dir={out}", f"data.root={data}", *TINY, *extra]


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` (links and FIFOs by kind, never opened) with its bytes."""
    found = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            found[rel] = ("special", os.readlink(p) if p.is_symlink() else None)
        elif p.is_file():
            found[rel] = p.read_bytes()
        else:
            found[rel] = "dir"
    return found


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def model_of(out):
    return latest_checkpoint(out)[1]["model"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------
# one owner


def test_a_second_trainer_on_the_same_directory_is_refused(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "race"
    # the torch loader: the lock is the point, and a DALI child compiles its Numba operators again
    cmd = [sys.executable, "-m", "ensiam_fast.train", *argv(out, tiny_dataset, "knn_every=0", "epochs=50",
                                                              "checkpoint_every=1", "data.backend=torch")]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()
        rc = train.main(argv(out, tiny_dataset, "knn_every=0", "epochs=50", "checkpoint_every=1", "seed=1",
                             "data.backend=torch"))  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2
        (line,) = error_lines(err)
        assert line.startswith(f"error: {out} is in use by PID {first.pid} on ")
        assert "seed: 0" in (out / "config.yaml").read_text()
    finally:
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, first_err
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # no step logged twice
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# a signal in each phase, then the same command again


def kill_self():
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert train.main(argv(out, tiny_dataset, "max_steps=4", "checkpoint_every=2")) == 0
    return out


def phase_start(monkeypatch):
    real = train.check_data
    monkeypatch.setattr(train, "check_data", lambda *a: kill_self() or real(*a))


def phase_knn(call: int):
    def patch(monkeypatch):
        real, calls = loop.knn_evaluate, []

        def knn(*a, **kw):
            calls.append(1)
            if len(calls) == call:
                kill_self()
            return real(*a, **kw)

        monkeypatch.setattr(loop, "knn_evaluate", knn)

    return patch


def phase_loop(monkeypatch):
    real = train.Trainer.train_step

    def step(self, x):
        if self.pos.step == 2:
            kill_self()
        return real(self, x)

    monkeypatch.setattr(train.Trainer, "train_step", step)


def phase_final_checkpoint(monkeypatch):
    real = loop.save_checkpoint

    def save(out, state, keep=3):
        if state["step"] == 4:
            kill_self()
        return real(out, state, keep=keep)

    monkeypatch.setattr(loop, "save_checkpoint", save)


def phase_curves(monkeypatch):
    real = loop.write_curves
    monkeypatch.setattr(loop, "write_curves", lambda *a: kill_self() or real(*a))


PHASES = {  # phase -> (patch, what the stopped run leaves: the newest checkpoint's step or None)
    "start checks": (phase_start, None),
    "step-0 kNN": (phase_knn(1), None),
    "loop": (phase_loop, 3),
    "final checkpoint": (phase_final_checkpoint, 4),
    "final kNN": (phase_knn(2), 4),
    "curves": (phase_curves, 4),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigterm_in_each_phase_then_rerun_equals_the_uninterrupted_run(
    tmp_path, tiny_dataset, uninterrupted, monkeypatch, capsys, phase
):
    patch, saved_step = PHASES[phase]
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        patch(m)
        rc = train.main(argv(out, tiny_dataset, "max_steps=4", "checkpoint_every=2"))
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and not error_lines(err)
    if saved_step is None:
        assert not list_checkpoints(out)
    else:
        assert latest_checkpoint(out)[1]["step"] == saved_step
    assert not (out / ".lock").exists() and not list(out.rglob("*.tmp") if out.exists() else [])
    assert train.main(argv(out, tiny_dataset, "max_steps=4", "checkpoint_every=2")) == 0
    rerun = capsys.readouterr()
    if phase in ("final checkpoint", "final kNN"):
        assert "finishing the final kNN evaluation" in rerun.out
    if phase == "curves":
        assert "already complete" in rerun.out
    whole, got = model_of(uninterrupted), model_of(out)
    assert whole.keys() == got.keys() and all(torch.equal(whole[k], got[k]) for k in whole)
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "knn_top1" in r] == [0, 4]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# resume: a change that would alter the math is refused, a moved dataset is not


@pytest.fixture()
def short_run(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    assert train.main(argv(out, tiny_dataset, "max_steps=2", "knn_every=0")) == 0
    return out


REFUSED = ["seed=1", "data.preset=strong", "optim.base_lr=1e-3", "epochs=3", "batch_size=4", "views=2",
           "model.proj_dim=16", "gradient_accumulation_steps=2", "data.split=train+unlabeled",
           "data.image_size=8"]  # fmt: skip


def test_each_changed_setting_is_refused_and_nothing_is_written(tmp_path, tiny_dataset, short_run, capsys):
    before = snapshot(short_run)
    other = make_tiny_dataset(tmp_path / "other", {"train": (48, True), "test": (24, True)}, seed=7)
    cases = [[c] for c in REFUSED] + [[f"data.root={other}"]]
    for change in cases:
        capsys.readouterr()
        rc = train.main(argv(short_run, tiny_dataset, "max_steps=2", "knn_every=0", *change))
        err = capsys.readouterr().err
        assert rc == 2, (change, err)
        (line,) = error_lines(err)
        key = change[0].split("=")[0] if "root" not in change[0] else "data.content"
        assert f"{key} " in line and " -> " in line and "nothing was written" in line, line
        assert snapshot(short_run) == before, change


def test_a_moved_dataset_resumes_and_an_allowed_change_continues(tmp_path, tiny_dataset, short_run, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_dataset, moved)
    assert train.main(argv(short_run, moved, "max_steps=3", "knn_every=0")) == 0
    assert f"resuming from {short_run / 'checkpoints' / 'step-00000002.pt'}" in capsys.readouterr().out
    assert latest_checkpoint(short_run)[1]["step"] == 3
    assert (
        train.main(argv(short_run, moved, "max_steps=4", "knn_every=0", "epochs=3", "resume.allow_changes=[epochs]"))
        == 0
    )
    out = capsys.readouterr()
    assert "epochs changed on purpose (2 -> 3)" in out.out
    assert latest_checkpoint(short_run)[1]["fingerprint"]["epochs"] == 3


def test_a_finished_run_run_again_writes_nothing(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "done"
    assert train.main(argv(out, tiny_dataset, "max_steps=2", "log_with=tensorboard")) == 0
    before = snapshot(out)
    for extra in ([], ["log_every=5", "knn_k=3"]):
        assert train.main(argv(out, tiny_dataset, "max_steps=2", "log_with=tensorboard", *extra)) == 0
        assert "already complete" in capsys.readouterr().out
        assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# links and FIFOs at every written path


def plant(path: Path, kind: str, victim: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "link":
        path.symlink_to(victim)
    else:
        os.mkfifo(path)


@pytest.mark.parametrize("kind", ["link", "fifo"])
@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl", "curves.png", "checkpoints", ".lock"])
def test_train_refuses_a_planted_run_file(tmp_path, tiny_dataset, capsys, kind, name):
    victim = tmp_path / "victim"
    victim.write_text("private")
    out = tmp_path / "run"
    plant(out / name, kind, victim)
    rc = train.main(argv(out, tiny_dataset, "max_steps=1", "knn_every=0"))
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = error_lines(err)
    assert str(out / name) in line
    assert victim.read_text() == "private" and not list_checkpoints(out)


def test_a_link_planted_as_the_next_checkpoint_stops_the_run_keeping_the_last(tmp_path, tiny_dataset, capsys):
    victim = tmp_path / "victim"
    victim.write_text("private")
    out = tmp_path / "run"
    assert train.main(argv(out, tiny_dataset, "max_steps=1", "knn_every=0")) == 0
    plant(out / "checkpoints" / "step-00000002.pt", "link", victim)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="symbolic link"):  # the newest name is skipped at the start
        rc = train.main(argv(out, tiny_dataset, "max_steps=2", "knn_every=0"))
    (line,) = error_lines(capsys.readouterr().err)
    assert rc == 2 and "step-00000002.pt is a symbolic link" in line
    assert victim.read_text() == "private"
    assert read_checkpoint(out / "checkpoints" / "step-00000001.pt")["step"] == 1


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(argv(out, tiny_dataset, "max_steps=1", "knn_every=0")) == 0
    return out


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_evaluate_and_export_refuse_planted_outputs(tmp_path, finished, capsys, kind):
    victim = tmp_path / "victim"
    victim.write_text("private")
    plant(finished / "knn.json", kind, victim)
    try:
        assert evaluate_cli.main(["knn", "--run", str(finished)]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert str(finished / "knn.json") in line
    finally:
        (finished / "knn.json").unlink()
    for planted in ("r18.pth", "r18.pth.json"):
        plant(tmp_path / planted, kind, victim)
        assert export.main(["--run", str(finished), "--format", "torchvision", "--out", str(tmp_path / "r18.pth")]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert str(tmp_path / planted) in line
        (tmp_path / planted).unlink()
    assert victim.read_text() == "private"
    assert not (finished / ".lock").exists()


def test_evaluate_into_a_run_in_use_is_refused(finished, capsys):
    with runlock.RunLock(finished):
        assert evaluate_cli.main(["knn", "--run", str(finished)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"is in use by PID {os.getpid()}" in line


# ---------------------------------------------------------------------------------------------
# storage


def test_output_dir_that_cannot_be_a_run_directory(tmp_path, tiny_dataset, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with small_filesystem(tmp_path, read_only=True) as ro:
        cases = [(afile, "is a regular file, not a directory"), (afile / "run", "is a file")]
        if ro is not None:
            cases.append((ro / "run", "read-only"))
        for out, needle in cases:
            assert train.main(argv(out, tiny_dataset, "max_steps=1")) == 2
            (line,) = error_lines(capsys.readouterr().err)
            assert needle in line, line
    assert train.main(argv(tmp_path / "r", tiny_dataset, "dist_timeout_s=.inf")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "dist_timeout_s" in line and "finite" in line


def test_a_full_disk_mid_save_is_one_line_naming_the_newest_checkpoint(tmp_path, tiny_dataset, capsys, monkeypatch):
    probe = tmp_path / "probe"
    assert train.main(argv(probe, tiny_dataset, "max_steps=1", "knn_every=0")) == 0
    size = list_checkpoints(probe)[0].stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    with small_filesystem(disk, f"{int(size * 1.5)}") as mnt:  # room for one checkpoint, not two
        out = (mnt or tmp_path) / "run"
        if mnt is None:  # no tmpfs: the second checkpoint's writes fail as a full disk's would
            real, saves = rundir.atomic_write, []

            def atomic_write(path, *a, **kw):
                if Path(path).suffix == ".pt":
                    saves.append(path)
                    if len(saves) == 2:
                        raise rundir.StorageError(f"could not write {kw.get('what')}: no space left on device")
                return real(path, *a, **kw)

            monkeypatch.setattr("ensiam_fast.checkpoint.atomic_write", atomic_write)
        rc = train.main(argv(out, tiny_dataset, "max_steps=3", "knn_every=0", "checkpoint_every=1"))
        err = capsys.readouterr().err
        assert rc == 2, err
        (line,) = error_lines(err)
        assert line == (f"error: could not write checkpoint step 2 to {out}: no space left on device; the newest "
                        "complete checkpoint is step 1")  # fmt: skip
        assert [p.name for p in list_checkpoints(out)] == ["step-00000001.pt"]
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# nothing non-finite saved


def test_a_diverging_run_stops_before_saving_inf(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "diverged"
    # at this lr a BatchNorm's running_var overflows within a few steps while the loss stays finite
    rc = train.main(argv(out, tiny_dataset, "optim.base_lr=1e12", "optim.warmup_epochs=0", "max_steps=8",
                         "knn_every=0", "checkpoint_every=1"))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    (line,) = error_lines(err)
    assert "non-finite" in line and "between steps" in line
    for path in list_checkpoints(out):
        state = read_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), path
