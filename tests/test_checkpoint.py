import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ensiam_fast.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(step):
    return {"step": step, "epoch": 0, "batch_in_epoch": step, "config": {}, "model": {"w": torch.full((2,), step)}}


def test_save_prunes_and_latest_picks_newest(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, _state(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000015.pt", "step-00000020.pt"]
    path, state = latest_checkpoint(tmp_path)
    assert state["step"] == 20 and path.name == "step-00000020.pt"
    assert not list(tmp_path.glob("checkpoints/*.tmp"))


def test_damaged_newest_is_skipped_with_warning(tmp_path, recwarn):
    save_checkpoint(tmp_path, _state(1))
    newest = save_checkpoint(tmp_path, _state(2))
    newest.write_bytes(newest.read_bytes()[:100])  # truncated mid-write by a crash
    path, state = latest_checkpoint(tmp_path)
    assert state["step"] == 1
    assert any("damaged" in str(w.message) for w in recwarn.list)


def test_missing_run_says_what_to_do(tmp_path):
    try:
        resolve_checkpoint(run=tmp_path)
    except CheckpointError as e:
        assert "no readable checkpoint" in str(e) and "train first" in str(e)
    else:
        raise AssertionError("expected CheckpointError")


def test_rng_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_newest_first_opens_only_what_it_needs(tmp_path, monkeypatch):
    import ensiam_fast.checkpoint as ckpt

    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _state(step), keep=5)
    opened = []
    real_load = torch.load

    def load(f, **kw):  # a path, or the file object open_regular gave (named through /proc on Linux)
        opened.append(Path(f if isinstance(f, (str, Path)) else os.readlink(f"/proc/self/fd/{f.fileno()}")).name)
        return real_load(f, **kw)

    monkeypatch.setattr(ckpt.torch, "load", load)
    path, state = latest_checkpoint(tmp_path)
    assert state["step"] == 3 and opened == ["step-00000003.pt"]


def test_damaged_newest_does_not_push_out_the_valid_one(tmp_path, recwarn):
    save_checkpoint(tmp_path, _state(1), keep=1)
    damaged = checkpoint_dir(tmp_path) / "step-00000009.pt"
    damaged.write_bytes(b"not a checkpoint")  # newer by name, but unreadable
    save_checkpoint(tmp_path, _state(2), keep=1)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert "step-00000002.pt" in names and "step-00000001.pt" not in names
    path, state = latest_checkpoint(tmp_path)
    assert state["step"] == 2  # the damaged newer file was tried first and skipped


def test_stale_tmp_is_removed_by_the_next_save(tmp_path):
    folder = checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    stale = folder / "step-00000004.pt.tmp"
    stale.write_bytes(b"half a checkpoint")  # a save cut short by SIGKILL
    save_checkpoint(tmp_path, _state(5))
    assert not stale.exists() and [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005.pt"]


def test_name_and_stored_step_must_agree(tmp_path):
    path = save_checkpoint(tmp_path, _state(3))
    path.rename(path.with_name("step-00000007.pt"))
    with pytest.raises(CheckpointError, match="holds step 3"):
        read_checkpoint(checkpoint_dir(tmp_path) / "step-00000007.pt")


class _Planted:
    """Unpickling this calls open(marker, "w"): the file appears only if the loader runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> Path:
    """A file that looks like one of our checkpoints and runs code when unpickled unrestricted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**_state(1), "format": "ensiam_fast-ckpt/2", "config": {}, "evil": _Planted(marker)}
    torch.save(state, path)
    return path


def test_planted_file_would_run_code_if_unpickled_unrestricted(tmp_path):
    # The control: proves the planted files below really execute code under a plain load.
    marker = tmp_path / "control-marker"
    torch.load(plant(tmp_path / "control.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.slow  # a child interpreter
@pytest.mark.parametrize("command", ["evaluate-knn-run", "export-checkpoint"])
def test_planted_checkpoint_does_not_run_code_through_the_commands(tmp_path, command):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    planted = plant(checkpoint_dir(run) / "step-00000001.pt", marker)
    if command == "evaluate-knn-run":
        argv = ["-m", "ensiam_fast.evaluate", "knn", "--run", str(run)]
    else:
        argv = ["-m", "ensiam_fast.export", "--checkpoint", str(planted), "--format", "timm",
                "--out", str(tmp_path / "out.safetensors")]  # fmt: skip
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "loading the planted checkpoint ran code"
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "step-00000001.pt" in lines[0] or str(run) in lines[0]


def test_rng_state_is_plain_data(tmp_path):
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    restored = torch.load(tmp_path / "rng.pt", weights_only=True)
    random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(restored)
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert a == (random.random(), float(np.random.rand()), float(torch.rand(1)))


def write_format_1(path: Path, state: dict) -> Path:
    """A checkpoint as ensiam_fast wrote it before format /2: the numpy RNG state a numpy array in a
    tuple, the Python one a tuple, no ``num_processes``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = {k: v for k, v in state.items() if k != "num_processes"}
    old.update(format="ensiam_fast-ckpt/1", rng={"python": random.getstate(), "numpy": np.random.get_state(),
                                                "torch": torch.get_rng_state()})  # fmt: skip
    torch.save(old, path)
    return path


def test_format_1_checkpoints_load_and_restore_every_generator(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    write_format_1(checkpoint_dir(tmp_path) / "step-00000004.pt", _state(4))
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "step-00000004.pt" and state["format"] == "ensiam_fast-ckpt/2" and state["step"] == 4
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(3).tolist()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_unreadable_checkpoints_are_an_error_not_a_fresh_start(tmp_path):
    folder = checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    for step in (3, 6):
        (folder / f"step-{step:08d}.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        latest_checkpoint(tmp_path)
    message = str(info.value)
    assert "none of the 2 checkpoint file(s)" in message and "step-00000006.pt" in message
    assert "move that folder away or use a new output_dir" in message
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000003.pt", "step-00000006.pt"]  # nothing removed
