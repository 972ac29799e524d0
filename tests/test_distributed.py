"""Several processes through the real launcher on the CPU: ``accelerate launch`` on this host.

Each run is a tiny network on tiny data, but a process start costs seconds: these are the slow
end-to-end tests, bounded by small max_steps and a short dist_timeout_s."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import free_port, make_tiny_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
TRAIN = REPO / "ensiam_fast" / "train.py"
# `accelerate launch` through this interpreter, not whichever `accelerate` is first on PATH
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
TINY = [
    "batch_size=8", "epochs=2", "log_every=1", "checkpoint_every=1000", "knn_every=1", "knn_k=5",
    "eval_batch_size=16", "data.image_size=16", "data.num_threads=1", "model.proj_hidden=32",
    "model.proj_dim=32", "model.pred_hidden=8", "model.channels_last=false", "model.cifar_stem=true",
    "optim.warmup_epochs=1", "mixed_precision=no",
    # the eval preset (no colour or blur): what these tests check (ranks' shards, synced weights, errors
    # at start, a lost rank) does not depend on the augmentation, and each DALI rank compiles the
    # default preset's four Numba operators again (about 60 s of a loaded 2-core machine a launch)
    "data.preset=eval",
]  # fmt: skip


@pytest.fixture(scope="module")
def id_dataset(tmp_path_factory):
    """Every training sample is its own class, so labels name samples: 48 train, 24 test."""
    root = tmp_path_factory.mktemp("ids")
    return make_tiny_dataset(root, {"train": (48, True), "test": (24, True)}, num_classes=48)


def launcher(script, args, *, machines: int = 1, machine_rank: int = 0, port: int | None = None):
    return launch_options(machines=machines, machine_rank=machine_rank, port=port) + [
        str(script), "--config", "demo", *args
    ]  # fmt: skip


def launch_options(*, machines: int = 1, machine_rank: int = 0, port: int | None = None) -> list[str]:
    """``accelerate launch`` for two processes over gloo, every setting given."""
    cmd = [
        *ACCELERATE_LAUNCH,
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        str(machines),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port or free_port()),
    ]
    if machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return cmd


def env(**extra):
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra)
    e.pop("ACCELERATE_USE_CPU", None)  # the point: no environment variable needed on a CPU host
    return e


def check_ranks_agree(dump_dir: Path, out: Path, num_samples: int | None):
    ranks = [torch.load(dump_dir / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"parameters/buffers differ between ranks: {differ[:5]}"
    assert any("running_mean" in k for k in a)  # the buffers were compared, not only parameters
    if num_samples is not None:  # one epoch: the two shards are disjoint and cover the split
        seen0, seen1 = ranks[0]["labels"], ranks[1]["labels"]
        assert len(seen0) == len(seen1) == num_samples // 2
        assert not set(seen0) & set(seen1)
        assert set(seen0) | set(seen1) == set(range(num_samples))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, id_dataset):
    """One epoch of a two-process job through accelerate launch: (the launcher's result, run dir, dumps)."""
    tmp = tmp_path_factory.mktemp("two")
    out, dumps = tmp / "run", tmp / "dumps"
    dumps.mkdir()
    args = [f"output_dir={out}", f"data.root={id_dataset}", *TINY, "max_steps=6"]  # 6 steps = one epoch
    proc = subprocess.run(launcher(WORKER, args), env=env(DUMP_DIR=str(dumps)), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    return proc, out, dumps


def test_two_processes_form_one_job(two_process_run):
    proc, out, dumps = two_process_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["num_processes"] == 2 and summary["mixed_precision"] == "no"
    assert summary["device"].startswith("cpu") and summary["final_step"] == 6
    check_ranks_agree(dumps, out, 48)
    knn = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "knn_top1" in line]
    assert knn and all(r["knn_samples"] == 24 for r in knn)  # each test sample scored exactly once


def test_the_summary_is_printed_once(two_process_run):
    proc, out, _ = two_process_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    # the JSON summary, the kNN start/end line and the run-directory line: each by the main process only
    assert sum(line.startswith("{") for line in lines) == 1, proc.stdout[-3000:]
    assert sum(line.startswith("kNN top-1: ") for line in lines) == 1, proc.stdout[-3000:]
    assert sum(line.startswith(f"run directory {out}") for line in lines) == 1, proc.stdout[-3000:]
    said = proc.stdout + proc.stderr  # tqdm.write lines go to stdout; the progress bar to stderr
    assert said.count("kNN top-1 at step 0") == 1, said[-3000:]


def test_evaluate_knn_with_two_processes(tmp_path, two_process_run):
    """`evaluate knn` as one two-process job: every test sample scored exactly once, the result the
    same as the trainer's own monitor on the same weights, printed and written once."""
    proc, out, _ = two_process_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    knn_end = json.loads(proc.stdout.strip().splitlines()[-1])["knn_end"]
    result = tmp_path / "knn.json"
    cmd = [*launch_options(), "-m", "ensiam_fast.evaluate", "knn", "--run", str(out), "--quiet", "--out", str(result)]
    ev = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    printed = [json.loads(line) for line in ev.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, ev.stdout[-3000:]  # one result line, from the main process
    record = json.loads(result.read_text())
    assert record == printed[0]
    assert record["samples"] == 24 and record["step"] == 6  # the 24 test samples, each once
    # the monitor's last kNN ran on these weights (buffers synced, then checkpointed): same protocol, same figure
    assert record["top1"] == pytest.approx(knn_end, abs=1e-6)


def test_a_resume_step_disagreement_stops_at_once(tmp_path, id_dataset):
    """A rank that sees no checkpoint where the others resume (storage not shared as it should be): every
    rank stops at start with one line naming the problem, long before the collective deadline."""
    from ensiam_fast.checkpoint import save_checkpoint
    from ensiam_fast.config import load_config

    out = tmp_path / "run"
    cfg = load_config("demo", [f"output_dir={out}", f"data.root={id_dataset}", *TINY])
    save_checkpoint(out, {"step": 2, "epoch": 0, "batch_in_epoch": 2, "num_processes": 2,
                          "config": cfg.to_dict(), "model": {}})  # fmt: skip
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    args = [f"output_dir={out}", f"data.root={id_dataset}", *TINY, "dist_timeout_s=900"]
    start = time.time()
    cmd = [
        sys.executable,
        "-m",
        "ensiam_fast.launch",
        *launcher(WORKER, args)[len(ACCELERATE_LAUNCH) :],
    ]  # ensiam-launch: keeps exit 2
    proc = subprocess.run(cmd, env=env(HIDE_CHECKPOINTS_ON_RANK="1"), capture_output=True, text=True, timeout=600)
    elapsed = time.time() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == (
        "error: the processes disagree on the checkpoint step to resume from (rank 0: 2, rank 1: None); "
        "every process must see the same checkpoints (one shared output_dir)"
    )
    assert elapsed < 600  # not the 900 s deadline: the disagreement is found, not waited out
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written (no config.yaml)


def test_two_loopback_machines_with_sync_bn(tmp_path, id_dataset):
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    port = free_port()
    # the torch loader: SyncBatchNorm across machines is the point, and a DALI process compiles its
    # Numba operators again (about 14 s CPU each); the DALI loader's shards: two_process_run above
    args = [f"output_dir={out}", f"data.root={id_dataset}", *TINY, "max_steps=2", "knn_every=0", "model.sync_bn=true",
            "data.backend=torch"]  # fmt: skip
    procs = [subprocess.Popen(launcher(WORKER, args, machines=2, machine_rank=r, port=port),
                              env=env(DUMP_DIR=str(dumps)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]  # fmt: skip
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert json.loads(results[0][0].strip().splitlines()[-1])["num_processes"] == 2
    check_ranks_agree(dumps, out, None)


def test_machines_with_different_output_dirs_stop_at_start(tmp_path, id_dataset):
    port = free_port()
    outs = [tmp_path / "a", tmp_path / "b"]
    args = [f"data.root={id_dataset}", *TINY, "max_steps=2", "dist_timeout_s=60"]
    procs = [subprocess.Popen(launcher(TRAIN, [f"output_dir={outs[r]}", *args], machines=2, machine_rank=r, port=port),
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]  # fmt: skip
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    errors = [ln for _, err in results for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "same output_dir" in errors[0], errors
    assert not (outs[1] / "config.yaml").exists() and not (outs[1] / "checkpoints").exists()


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The process of ``rank``, not one of its loader's workers (forked: the same command and environment)."""
    found = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                found[child.pid] = child.ppid()
        except psutil.Error:
            continue
    ranks = [pid for pid, parent in found.items() if parent not in found]
    return ranks[0] if len(ranks) == 1 else None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_lost_rank_ends_the_job_within_the_timeout(tmp_path, id_dataset, sig):
    # 15 s (was 30): the frozen rank's error still comes only from the deadline (a killed rank's comes
    # at once), with margin over the ranks' few-second skew at a steady step on a loaded machine
    out, timeout_s = tmp_path / "run", 15
    # the torch loader: losing a rank is the point, and a DALI process compiles its Numba operators again
    args = [f"output_dir={out}", f"data.root={id_dataset}", *TINY, "epochs=200", "knn_every=0",
            f"dist_timeout_s={timeout_s}", "data.backend=torch"]  # fmt: skip
    proc = subprocess.Popen(launcher(TRAIN, args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    victim = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        victim = rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, sig)
        start = time.time()
        _, err = proc.communicate(timeout=timeout_s + 150)
        elapsed = time.time() - start
    finally:
        if victim is not None and psutil.pid_exists(victim):
            os.kill(victim, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    # The survivor's collective fails: at once for a dead peer, after dist_timeout_s for a frozen
    # one; the launcher then stops what is left (a stopped process only by SIGKILL, after its grace).
    assert elapsed < timeout_s + 90, elapsed
    if sig == signal.SIGSTOP:
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert any("rank 0: lost contact with another process" in ln for ln in lines), err[-3000:]


def test_errors_under_accelerate_launch_are_one_line(tmp_path, id_dataset):
    # Two processes, one error every rank finds: reported once, by the first process.
    out = tmp_path / "run"
    args = [f"output_dir={out}", "data.root=/nonexistent/dataset", *TINY]
    proc = subprocess.run(launcher(TRAIN, args), env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # accelerate's launcher turns the processes' exit code 2 into its own 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "/nonexistent/dataset does not exist" in lines[0], proc.stderr[-3000:]
    assert "ensiam_fast/" not in "".join(ln for ln in proc.stderr.splitlines() if ln.strip().startswith("File "))
    assert not out.exists()


def test_a_launch_that_yields_one_process_says_so(tmp_path, id_dataset):
    # Without --multi_gpu, accelerate's plain launcher starts one process however many were asked for.
    cmd = [
        *ACCELERATE_LAUNCH,
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(TRAIN),
        "--config",
        "demo",
        f"output_dir={tmp_path / 'run'}",
        "data.root=/nonexistent/dataset",
        *TINY,
    ]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert "warning: accelerate launch was asked for several processes but started only this one" in proc.stderr
    # accelerate's plain launcher (without --quiet) repeats the child's stderr in its own traceback
    assert len({ln for ln in proc.stderr.splitlines() if ln.startswith("error:")}) == 1
