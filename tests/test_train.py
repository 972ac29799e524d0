"""End-to-end runs of the real entry point on tiny shards (CPU, a few seconds each)."""

import json

import pytest
import torch

from ensiam_fast import train
from ensiam_fast.checkpoint import latest_checkpoint
from ensiam_fast.config import load_config
from ensiam_fast.schedule import cosine_lr

# A CPU-sized network and run: small heads, batch 8, 16x16 crops of the tiny 32x32 dataset.
TINY = [
    "batch_size=8", "epochs=2", "log_every=1", "checkpoint_every=1000", "knn_every=1", "knn_k=5",
    "eval_batch_size=16", "data.image_size=16", "data.num_threads=1", "model.proj_hidden=32",
    "model.proj_dim=32", "model.pred_hidden=8", "model.channels_last=false",
    "model.cifar_stem=true", "optim.warmup_epochs=1",
    "mixed_precision=no",
]  # fmt: skip


def run_main(tmp_path, tiny_dataset, *extra, name="run"):
    out = tmp_path / name
    argv = ["--config", "demo", f"output_dir={out}", f"data.root={tiny_dataset}", *TINY, *extra]
    return train.main(argv), out


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# EnSiam (the default) in the fast suite; the other methods' trainer runs in the full one (their
# losses and targets are checked in process by tests/test_losses.py and test_methods.py)
@pytest.mark.parametrize(
    "method, views",
    [
        ("ensiam", 4),
        pytest.param("simsiam_kaug", 4, marks=pytest.mark.slow),
        pytest.param("simsiam", 2, marks=pytest.mark.slow),
        pytest.param("fastsiam", 3, marks=pytest.mark.slow),
    ],
)
def test_smoke_run_each_method(tmp_path, tiny_dataset, method, views, capsys):
    rc, out = run_main(tmp_path, tiny_dataset, f"method={method}", f"views={views}", "max_steps=3")
    assert rc == 0
    rows = metrics(out)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3]
    for r in rows:
        if "loss" in r:
            assert torch.isfinite(torch.tensor(r["loss"]))
            assert {"epoch", "lr", "images_per_s", "data_wait", "collapse_std"} <= set(r)
            assert 0.0 <= r["data_wait"] <= 1.0 and r["images_per_s"] > 0
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert knn_rows[0]["step"] == 0 and knn_rows[-1]["step"] == 3  # random-init baseline and the end
    assert (out / "config.yaml").is_file()
    _, state = latest_checkpoint(out)
    assert state["step"] == 3 and state["config"]["method"] == method
    assert "kNN top-1" in capsys.readouterr().out


@pytest.mark.slow  # three trainer runs (a resume in the fast suite: the format-1 checkpoint test)
def test_resume_matches_uninterrupted_run(tmp_path, tiny_dataset):
    # 6 batches per epoch (48 / 8): stopping at step 4 leaves the data position mid-epoch.
    rc, whole = run_main(tmp_path, tiny_dataset, "max_steps=8", "knn_every=0", name="whole")
    assert rc == 0
    rc, split = run_main(tmp_path, tiny_dataset, "max_steps=4", "knn_every=0", name="split")
    assert rc == 0
    _, first = latest_checkpoint(split)
    assert (first["step"], first["epoch"], first["batch_in_epoch"]) == (4, 0, 4)
    rc, _ = run_main(tmp_path, tiny_dataset, "max_steps=8", "knn_every=0", name="split")
    assert rc == 0
    steps = [r["step"] for r in metrics(split) if "loss" in r]
    assert steps == list(range(1, 9))  # continued at step 5, did not restart at 1
    a, b = latest_checkpoint(whole)[1], latest_checkpoint(split)[1]
    assert (b["step"], b["epoch"], b["batch_in_epoch"]) == (8, 1, 2)
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), rtol=1e-5, atol=1e-6), key
    losses_whole = [r["loss"] for r in metrics(whole) if "loss" in r]
    losses_split = [r["loss"] for r in metrics(split) if "loss" in r]
    assert losses_whole == pytest.approx(losses_split, rel=1e-5)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["data.root=/nonexistent/dataset"], "does not exist"),
        (["data.split=validation"], "has no split 'validation'"),
        (["data.knn_train_split=unlabeled"], "unlabelled"),
        (["batch_size=4096"], "larger than split"),
        (["method=simsiam_kaug", "views=3"], "views must be even"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, tiny_dataset, capsys, extra, needle):
    rc, out = run_main(tmp_path, tiny_dataset, *extra)
    assert rc != 0
    assert needle in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


def test_empty_dataset_dir_is_reported(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = train.main(["--config", "demo", f"output_dir={tmp_path / 'r'}", f"data.root={empty}"])
    assert rc != 0 and "manifest.json is missing" in capsys.readouterr().err


def test_lr_schedule_warmup_then_cosine():
    peak = 0.2
    assert cosine_lr(0, 100, peak, 10) == pytest.approx(0.02)
    assert cosine_lr(9, 100, peak, 10) == pytest.approx(peak)
    assert cosine_lr(10, 100, peak, 10) == pytest.approx(peak)
    assert cosine_lr(55, 100, peak, 10) == pytest.approx(peak / 2)
    assert cosine_lr(99, 100, peak, 10) < 0.001
    assert load_config("demo").optim.base_lr > 0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_dataset, capsys, monkeypatch):
    from ensiam_fast import methods

    forward = methods.SSLMethod.forward
    calls = {"n": 0}

    def poisoned(self, x):  # the 4th step's loss becomes NaN, as a diverging run's would
        out = forward(self, x)
        calls["n"] += 1
        if calls["n"] == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(methods.SSLMethod, "forward", poisoned)
    # Logging every 5 steps: the checkpoint due at step 4 must still check the loss first.
    rc, out = run_main(tmp_path, tiny_dataset, "max_steps=6", "knn_every=0", "checkpoint_every=2", "log_every=5")
    assert rc != 0
    err = capsys.readouterr().err
    assert "non-finite" in err and "between steps 2 and 4" in err
    _, state = latest_checkpoint(out)
    assert state["step"] == 2  # written before the NaN; nothing after it was saved
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow  # a child interpreter
def test_sigterm_writes_a_checkpoint_and_the_same_command_resumes(tmp_path, tiny_dataset):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    # the torch loader (both runs: it is part of the resume fingerprint): the signal is the point, and a
    # DALI child compiles DALI's Numba operators again (about 14 s CPU); DALI's loader state across a
    # stop: tests/test_loader_state.py and test_lifecycle.py, in process
    argv = [sys.executable, "-m", "ensiam_fast.train", "--config", "demo", f"output_dir={out}",
            f"data.root={tiny_dataset}", *TINY, "knn_every=0", "epochs=50", "data.backend=torch"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = out / "metrics.jsonl"
    deadline = time.time() + 300  # start-up alone takes minutes on a loaded 2-core host
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "resume" in err
    _, state = latest_checkpoint(out)
    stopped_at = state["step"]
    assert stopped_at >= 2
    # The stopped run drew its curves so far (no run had ended in this directory before).
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same command, now capped a few steps later: it resumes where the signal stopped it.
    rc, _ = run_main(tmp_path, tiny_dataset, "knn_every=0", "epochs=50", f"max_steps={stopped_at + 2}",
                     "data.backend=torch", name="killed")  # fmt: skip
    assert rc == 0
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, stopped_at + 3))


@pytest.mark.slow  # a child interpreter
def test_sigkill_before_the_first_checkpoint_leaves_no_step_twice(tmp_path, tiny_dataset):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    # the torch loader: its forked DataLoader workers outlive the SIGKILLed trainer by a few seconds, and
    # the immediate rerun below must not find the run "in use" by the dead trainer (runlock.py)
    argv = [sys.executable, "-m", "ensiam_fast.train", "--config", "demo", f"output_dir={out}",
            f"data.root={tiny_dataset}", *TINY, "knn_every=0", "epochs=50", "data.backend=torch"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_file = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # no handler runs: no checkpoint, whatever was logged stays
    proc.wait(timeout=60)
    assert latest_checkpoint(out) is None and len(metrics_file.read_text().splitlines()) >= 2
    with open(metrics_file, "a") as f:
        f.write('{"step": 9, "lo')  # and a line torn mid-write
    rc, _ = run_main(tmp_path, tiny_dataset, "knn_every=0", "epochs=50", "max_steps=3", name="killed")
    assert rc == 0
    steps = [r["step"] for r in metrics(out)]
    assert steps == [1, 2, 3]


def test_a_format_1_checkpoint_is_resumed_not_retrained(tmp_path, tiny_dataset, tiny_run, capsys):
    from conftest import TINY_RUN, copy_run
    from test_checkpoint import write_format_1

    out = copy_run(tiny_run, tmp_path)  # the session's 3-step run (tests/conftest.py), its own copy
    path, state = latest_checkpoint(out)
    assert state["step"] == 3
    write_format_1(path, state)  # as the code before format /2 wrote it (it used to be skipped: a run from step 0)
    assert torch.load(path, weights_only=False)["format"] == "ensiam_fast-ckpt/1"
    capsys.readouterr()
    assert train.main([*TINY_RUN, f"output_dir={out}", f"data.root={tiny_dataset}", "max_steps=4"]) == 0
    assert f"resuming from {path} at step 3" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert latest_checkpoint(out)[1]["format"] == "ensiam_fast-ckpt/2"  # written back in the current format
