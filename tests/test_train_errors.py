"""Every user error ends the run with one line ``error: ...`` naming the key or file, exit code 2,
and leaves the run directory exactly as it was (a refused rerun must not overwrite config.yaml)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ensiam_fast import train
from ensiam_fast.checkpoint import save_checkpoint
from ensiam_fast.config import load_config, save_config

TINY = [
    "batch_size=8", "epochs=2", "log_every=1", "checkpoint_every=1000", "knn_every=0", "eval_batch_size=16",
    "data.image_size=16", "data.num_threads=1", "model.proj_hidden=32", "model.proj_dim=32",
    "model.pred_hidden=8", "model.channels_last=false", "model.cifar_stem=true", "mixed_precision=no",
]  # fmt: skip


@pytest.fixture
def earlier_run(tmp_path, tiny_dataset):
    """A run directory as an earlier run left it: config.yaml, a checkpoint at step 2, metrics."""
    out = tmp_path / "run"
    cfg = load_config("demo", [f"output_dir={out}", f"data.root={tiny_dataset}", *TINY])
    out.mkdir()
    save_config(cfg, out / "config.yaml")
    state = {"step": 2, "epoch": 0, "batch_in_epoch": 2, "num_processes": 1, "config": cfg.to_dict(), "model": {}}
    save_checkpoint(out, state)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": -0.5}) + "\n")
    return out


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def bad_manifest(tmp_path, tiny_dataset) -> Path:
    root = tmp_path / "bad_manifest"
    shutil.copytree(tiny_dataset, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["num_samples"] = "forty-eight"
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


CASES = [  # (overrides, what the line must name)
    (["optim.base_lr=-0.1"], "optim.base_lr=-0.1"),
    (["seed=-1"], "seed=-1"),
    (["data.preset=strongest"], "data.preset='strongest'"),
    (["data.preset_overrides={blurr_p: 1.0}"], "'blurr_p'"),
    (["data.preset_overrides={blur_p: [1, 2]}"], "data.preset_overrides.blur_p"),
    (["model.backbone=resnet81"], "model.backbone='resnet81'"),
    (["data.preset=very_strong", "data.image_size=30"], "jigsaw grid 4"),
    (["data.image_size=null", "data.preset_overrides={jigsaw_grid: 5}"], "jigsaw grid 5"),  # the manifest's 32
    (["data.root=BAD_MANIFEST"], "manifest.json: split 'train' has a field of the wrong type"),
    (["data.root=/nonexistent/dataset"], "/nonexistent/dataset does not exist"),
    (["data.split=validation"], "'validation'"),
    (["batch_size=4096"], "batch_size=4096"),
    (["momentum=0.9"], "unknown config key 'momentum'"),
    (["dist_timeout_s=0"], "dist_timeout_s=0"),
    (["data.gpu_memory_gb=0"], "data.gpu_memory_gb=0"),
    (["data.gpu_memory_gb=0.0001"], "batch of 8 images x 4 views per GPU projects"),  # the pipeline's memory guard
    (["batch_size=16"], "batch_size=8 but this config has batch_size=16"),  # resume with another batch
    (["method=simsiam", "views=2"], "method='ensiam' but this config has method='simsiam'"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, needle", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, tiny_dataset, earlier_run, capsys, overrides, needle):
    if any("BAD_MANIFEST" in o for o in overrides):
        root = bad_manifest(tmp_path, tiny_dataset)
        overrides = [o.replace("BAD_MANIFEST", str(root)) for o in overrides]
    before = snapshot(earlier_run)
    argv = ["--config", "demo", f"output_dir={earlier_run}", f"data.root={tiny_dataset}", *TINY, *overrides]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert snapshot(earlier_run) == before


def test_a_process_count_change_is_refused(tmp_path, tiny_dataset, earlier_run, capsys):
    cfg = load_config(earlier_run / "config.yaml")
    save_checkpoint(earlier_run, {"step": 3, "epoch": 0, "batch_in_epoch": 3, "num_processes": 2,
                                  "config": cfg.to_dict(), "model": {}})  # fmt: skip
    before = snapshot(earlier_run)
    assert train.main(["--config", str(earlier_run / "config.yaml")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error:") and "written by 2 process(es) but this launch has 1" in line
    assert snapshot(earlier_run) == before


@pytest.mark.slow  # a child interpreter
@pytest.mark.parametrize("overrides", [["seed=-1"], ["data.root=/nonexistent/dataset"]])
def test_python_m_prints_one_line(tmp_path, tiny_dataset, overrides):
    argv = [sys.executable, "-m", "ensiam_fast.train", "--config", "demo", f"output_dir={tmp_path / 'r'}",
            f"data.root={tiny_dataset}", *TINY, *overrides]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert not (tmp_path / "r").exists()


def test_unreadable_checkpoints_stop_the_run_instead_of_restarting(tmp_path, tiny_dataset, earlier_run, capsys):
    # Resuming over checkpoints none of which loads would train from step 0 and prune them away.
    checkpoint = next((earlier_run / "checkpoints").glob("step-*.pt"))
    checkpoint.write_bytes(b"damaged")
    before = snapshot(earlier_run)
    assert train.main(["--config", str(earlier_run / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: none of the 1 checkpoint file(s)"), err
    assert str(checkpoint) in err and "move that folder away or use a new output_dir" in err
    assert snapshot(earlier_run) == before
