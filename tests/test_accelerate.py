"""Accelerate's conventions in the trainer: mixed precision from Accelerate's own setting, gradient
accumulation through ``accelerator.accumulate``, and ``log_with``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from ensiam_fast import train
from ensiam_fast.checkpoint import latest_checkpoint
from ensiam_fast.methods import SSLMethod
from ensiam_fast.models import SiameseNet
from ensiam_fast.placement import DeviceError, resolve_device, resolve_mixed_precision

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "batch_size=8", "epochs=1", "knn_every=0", "log_every=1", "checkpoint_every=1000", "data.image_size=16",
    "data.num_threads=1", "model.proj_hidden=32", "model.proj_dim=32", "model.pred_hidden=8",
    "model.channels_last=false", "optim.warmup_epochs=0", "data.backend=torch",  # no DALI kernels to compile
]  # fmt: skip


def events(run: Path) -> list[Path]:
    return list(run.rglob("events.out.tfevents*"))


def test_mixed_precision_auto_defers_to_accelerate(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision sets
    assert resolve_mixed_precision("auto") == "bf16"
    assert resolve_mixed_precision("no") == "no"  # the config's explicit value wins
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == "no"  # without a launcher setting: none on a CPU


def test_one_device_rule(monkeypatch):
    """placement.resolve_device reads every device string of the loaders and the tools."""
    assert resolve_device("cpu") == ("cpu", None, torch.device("cpu"))
    for bad in ("tpu", "cpu:0", "cuda:x", "gpu:-1", ""):
        with pytest.raises(
            DeviceError, match=f"--device must be 'auto', 'cpu', 'gpu', 'cuda' or 'cuda:N', got {bad!r}"
        ):
            resolve_device(bad, what="--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only host, whatever this one is
    assert resolve_device("auto") == ("cpu", None, torch.device("cpu"))
    for gpu in ("gpu", "cuda", "cuda:1", "gpu:0"):
        with pytest.raises(DeviceError, match=f"device={gpu!r} asks for a GPU but torch sees no CUDA device"):
            resolve_device(gpu)


@pytest.mark.slow
def test_accelerate_launch_mixed_precision_flag_is_used(tmp_path, tiny_dataset):
    """`accelerate launch --mixed_precision bf16` with the config at auto trains in bf16 and says so."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--mixed_precision",
        "bf16",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--cpu",
        str(REPO / "ensiam_fast" / "train.py"),
        "--config",
        "demo",
        f"data.root={tiny_dataset}",
        f"output_dir={out}",
        "max_steps=1",
        *TINY,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["mixed_precision"] == "bf16" and summary["num_processes"] == 1
    assert events(out), "log_with defaults to tensorboard: its event file is in the run directory"


def test_log_with_none_writes_no_events_and_accumulation_counts_optimizer_steps(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "run"
    argv = [
        "--config",
        "demo",
        f"data.root={tiny_dataset}",
        f"output_dir={out}",
        "max_steps=2",
        "gradient_accumulation_steps=2",
        "log_with=none",
        "mixed_precision=no",
        *TINY,
    ]
    assert train.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["gradient_accumulation_steps"] == 2 and summary["final_step"] == 2
    # 48 images / batch 8 = 6 optimizer steps of 2 loader batches of 4 each per epoch
    assert summary["steps_per_epoch"] == 6
    _, state = latest_checkpoint(out)
    assert (state["step"], state["batch_in_epoch"]) == (2, 4)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert events(out) == []


@pytest.mark.slow
def test_log_with_wandb_offline_writes_a_run(tmp_path, tiny_dataset):
    """`log_with=wandb` with WANDB_MODE=offline (no account, no network): one offline run in the run
    directory holding the flattened config and every logged value."""
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "ensiam_fast.train", "--config", "demo", f"data.root={tiny_dataset}",
           f"output_dir={out}", "max_steps=2", "log_with=wandb", "mixed_precision=no", *TINY]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    (record_file,) = runs[0].glob("run-*.wandb")
    stored = record_file.read_bytes()  # wandb's record log: protobuf records whose values are JSON text
    assert b"optim.base_lr" in stored  # the config, flattened
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    for record in logged:
        for key in ("loss", "collapse_std", "lr"):
            assert json.dumps(record[key]).encode() in stored, (key, record[key])
    assert events(out) == []  # wandb instead of TensorBoard, not both


def test_log_with_unknown_value_is_a_config_error(tmp_path, capsys):
    assert train.main(["--config", "demo", "log_with=mlflow", f"output_dir={tmp_path / 'r'}"]) == 2
    assert "log_with='mlflow'" in capsys.readouterr().err


class NoBNBackbone(nn.Module):
    num_features = 8

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def one_update(batches: list[torch.Tensor], accumulation: int) -> dict[str, torch.Tensor]:
    """Parameters after ``Trainer.train_step`` ran over ``batches`` with that accumulation."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = SiameseNet(
        NoBNBackbone(),
        nn.Linear(8, 6),
        nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 6)),
        backbone_name="none",
        cifar_stem=False,
        bn_mode="joint",
    )
    method = SSLMethod(model, "ensiam", views=2)
    trainer = train.Trainer.__new__(train.Trainer)  # only what train_step uses, no data
    trainer.cfg = train.load_config("demo", ["model.channels_last=false"])
    trainer.accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    trainer.method, trainer.optimizer = trainer.accelerator.prepare(method, optimizer)
    trainer.step_fn, trainer.raw_method = trainer.method, method
    trainer.views_per_pass = 2  # the fused step (all K=2 views in one pass)
    trainer.pos = train.Position()
    trainer.schedule_steps, trainer.warmup_steps, trainer.peak_lr = 10, 0, 0.5
    start = {k: v.detach().clone() for k, v in method.named_parameters()}
    for i, x in enumerate(batches):
        trainer.train_step(x)
        mid = i < len(batches) - 1
        assert trainer.pos.step == (0 if mid else 1)
        if mid:  # no optimizer step before the last batch of the accumulation
            assert all(torch.equal(start[k], v) for k, v in method.named_parameters())
    return {k: v.detach().clone() for k, v in method.named_parameters()}


def test_two_accumulated_half_batches_equal_one_full_batch():
    x = torch.randint(0, 256, (2, 8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    full = one_update([x], accumulation=1)
    halves = one_update([x[:, :4], x[:, 4:]], accumulation=2)
    for name in full:
        torch.testing.assert_close(halves[name], full[name], rtol=1e-5, atol=1e-6)
    # control: one half alone is a different update, so the comparison can fail
    alone = one_update([x[:, :4]], accumulation=1)
    assert any(not torch.allclose(alone[n], full[n], atol=1e-6) for n in full)
