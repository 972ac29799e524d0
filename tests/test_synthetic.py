"""data.backend=synthetic: the loader's contract, and the full trainer with DALI and webdataset unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ensiam_fast.checkpoint import latest_checkpoint
from ensiam_fast.data import build_loader
from ensiam_fast.data.synthetic import SyntheticLoader

ROOT = Path(__file__).resolve().parents[1]

# Runs the real entry point in a fresh interpreter where importing nvidia.dali, webdataset (or
# anything under them) raises ImportError, as on a machine that has neither installed.
BLOCKED_MAIN = """
import importlib, importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nvidia", "webdataset"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
for name in list(sys.modules):
    if name.split(".")[0] in ("nvidia", "webdataset"):
        del sys.modules[name]
from ensiam_fast import train
rc = train.main(sys.argv[1:])
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"nvidia", "webdataset"})
print("loaded:" + ",".join(loaded))
# the control: the blocker makes the torch loader and DALI fail to import (else the line above proves nothing)
for module in ("ensiam_fast.data.torch", "nvidia.dali"):
    try:
        importlib.import_module(module)
        print(f"control: {module} imported")
    except ImportError as e:
        print(f"control: {module}: {e}")
sys.exit(rc)
"""

TINY = ["batch_size=8", "log_every=1", "checkpoint_every=2", "knn_every=0", "data.image_size=16",
        "model.proj_hidden=32", "model.proj_dim=32", "model.pred_hidden=8", "model.channels_last=true",
        "data.backend=synthetic", "data.synthetic_samples=32", "mixed_precision=no"]  # fmt: skip


def run_blocked(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", BLOCKED_MAIN, *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)  # fmt: skip


def test_loader_contract():
    loader = build_loader("/nonexistent", "train", batch_size=4, views=3, preset="default", image_size=8,
                          backend="synthetic", num_samples=20, seed=1)  # fmt: skip
    assert isinstance(loader, SyntheticLoader) and len(loader) == 5
    loader.set_epoch(3)
    batches = list(loader.iter_from(2))
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (3, 4, 3, 8, 8) and x.dtype == torch.uint8 and y.shape == (4,) and y.dtype == torch.int64
    assert not torch.equal(batches[0][0], batches[1][0])  # consecutive steps see different images
    assert x.float().std() > 50  # uniform bytes, not a constant
    other_rank = SyntheticLoader(batch_size=4, views=3, image_size=8, seed=1, shard_id=1, num_shards=2,
                                 num_samples=20)  # fmt: skip
    assert len(other_rank) == 2 and not torch.equal(other_rank.batches[0], loader.batches[0])
    with pytest.raises(ValueError, match="synthetic"):
        build_loader("/x", "train", batch_size=4, views=2, preset="default", backend="synthtic")


@pytest.mark.slow  # a child interpreter
def test_trainer_runs_without_dali_or_webdataset(tmp_path):
    out = tmp_path / "run"
    proc = run_blocked("--config", "demo", f"output_dir={out}", "data.root=/nonexistent/shards", "max_steps=5",
                       *TINY)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-3] == "loaded:"  # neither nvidia.* nor webdataset got imported
    # ... and that is because the trainer needs neither: the blocker does make the real loaders fail
    assert lines[-2:] == [
        "control: ensiam_fast.data.torch: webdataset is blocked in this test",
        "control: nvidia.dali: nvidia is blocked in this test",
    ], lines[-2:]
    summary = json.loads(lines[-4])
    assert summary["final_step"] == 5 and summary["steps_per_epoch"] == 4  # 32 images / batch 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["images_per_s"] > 0 for r in rows)
    _, state = latest_checkpoint(out)
    assert state["step"] == 5 and state["epoch"] == 1 and state["config"]["data"]["backend"] == "synthetic"


@pytest.mark.parametrize("extra, message", [
    (["knn_every=1"], "knn_every=0"),
    (["data.image_size=null"], "set data.image_size"),
    (["data.synthetic_samples=4"], "data.synthetic_samples=4"),
])  # fmt: skip
def test_bad_settings_exit_2(tmp_path, extra, message, capsys):
    from ensiam_fast import train

    rc = train.main(["--config", "demo", f"output_dir={tmp_path / 'r'}", *TINY, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err
    assert not (tmp_path / "r" / "checkpoints").exists()
