"""tools/gpu_suite.sh --dry-run: every step of the device suite runs (tiny, on the CPU) and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"tests", "e2e_r18_b256", "e2e_r18_b1024", "e2e_r50_224", "train_step_eager", "train_step_compiled",
         "memory_views", "cuda_stages"}  # fmt: skip


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}  # the script's interpreter: this one, not python3 from PATH
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_suite.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    head = json.loads(proc.stdout.strip().splitlines()[-1])
    assert head["dry_run"] and head["status"] == {name: "ok" for name in STEPS}
    for name in ("e2e_r18_b256", "e2e_r18_b1024", "e2e_r50_224"):
        assert head[name]["images_per_s"] > 0 and 0 <= head[name]["data_wait"] <= 1
    assert head["e2e_r50_224"]["run"] == "imagenet/synthetic"
    row = head["train_step_eager"][0]
    assert all(row[f"{impl}_images_per_s"] > 0 for impl in ("fused", "loop", "joint"))
    assert set(head["train_step_eager_bn_layer_ms"][0]) >= {"joint", "per_view", "per_view_cat"}
    assert {(r["views_per_pass"], r["grad_checkpointing"]) for r in head["memory_views"]} == {
        (2, False), (1, False), (2, True), (1, True)}  # fmt: skip
    assert head["cuda_stages"]["bit_exact"] is True  # through Numba's CUDA simulator in the dry run
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert set(report["steps"]) == STEPS and (tmp_path / "logs" / "tests.log").is_file()
    assert "| e2e_r18_b256 |" in (tmp_path / "gpu_suite.md").read_text()


@pytest.mark.slow  # a child interpreter
def test_suite_modules_import_neither_dali_nor_webdataset():
    # The device machine has neither: the suite's own modules must not import them at module import.
    code = (
        "import sys; sys.path[:0] = ['tools']; import gpu_suite, bench_train, bench_end_to_end, bench_cuda_stages; "
        "import pipelines.kernels.cuda; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'nvidia', 'webdataset'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
