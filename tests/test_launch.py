"""``ensiam-launch`` (ensiam_fast/launch.py): ``accelerate launch`` whose failures end with the launched
process's own one line and exit code, for one process and for a two-process gloo job on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "ensiam_fast" / "train.py")
# every launcher setting given, so accelerate prints no "defaults used" banner: stderr is only ours
LAUNCH = [sys.executable, "-m", "ensiam_fast.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]  # fmt: skip
ONE = ["--cpu", "--num_processes", "1", "--num_cpu_threads_per_process", "1"]
TWO = ["--multi_gpu", "--num_processes", "2"]
TINY = ["batch_size=8", "epochs=1", "knn_every=0", "data.image_size=16", "data.num_threads=1",
        "model.proj_hidden=32", "model.proj_dim=32", "model.pred_hidden=8", "data.backend=torch"]  # fmt: skip


def launch(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    if "--multi_gpu" in args:
        args = ["--main_process_port", str(free_port()), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(
    "processes, overrides, needle",
    [
        (ONE, ["seed=-1"], "seed=-1"),  # found when the config loads, before any process group
        (TWO, ["seed=-1"], "seed=-1"),
        (TWO, ["data.root=/nonexistent/dataset"], "/nonexistent/dataset does not exist"),  # found by every rank
    ],
    ids=["1 process, config", "2 processes, config", "2 processes, data"],
)
def test_a_user_error_is_one_line_and_exit_2(tmp_path, tiny_dataset, processes, overrides, needle):
    out = tmp_path / "run"
    args = [*processes, TRAIN, "--config", "demo", f"data.root={tiny_dataset}", f"output_dir={out}", *TINY, *overrides]
    proc = launch(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_a_crash_keeps_its_code_and_names_the_rank(tmp_path):
    script = tmp_path / "crash.py"
    # rank 1 fails with code 3; rank 0 waits to be stopped by the launcher
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    print('rank 1 gives up', file=sys.stderr); sys.exit(3)\n"
        "time.sleep(120)\n"
    )
    proc = launch([*TWO, str(script)], tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == ["rank 1 gives up", lines[-1]], proc.stderr[-3000:]
    assert lines[-1].startswith("error: rank 1 (local rank 1 on ") and "exited with code 3" in lines[-1]
    assert "Traceback" not in proc.stderr and "FAILED" not in proc.stderr


@pytest.mark.slow
def test_a_killed_process_gives_128_plus_the_signal(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = launch([*ONE, str(script)], tmp_path)
    assert proc.returncode == 128 + 9, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["error: the process was killed by SIGKILL; its output is above"]


def test_failure_exit_code_reads_both_launchers_errors():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from ensiam_fast.launch import describe, failure_exit_code

    assert failure_exit_code(subprocess.CalledProcessError(2, ["x"])) == (2, "the process")
    early = ProcessFailure(local_rank=1, pid=11, exitcode=2, error_file="")
    late = ProcessFailure(local_rank=0, pid=10, exitcode=-15, error_file="")
    early.timestamp, late.timestamp = 100, 101
    code, who = failure_exit_code(ChildFailedError("train.py", {0: late, 1: early}))
    assert code == 2 and who.startswith("rank 1 (local rank 1 on ")  # the first failure, not rank 0
    assert failure_exit_code(RuntimeError("x")) is None
    assert describe(-9, "rank 0") == "rank 0 was killed by SIGKILL"
