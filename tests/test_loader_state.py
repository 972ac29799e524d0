"""Constant-cost exact resume: the DALI loader's saved state instead of replaying an epoch's batches."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("nvidia.dali")

from ensiam_fast.data.loader import build_loader  # noqa: E402


def _loader(root, epoch=1):
    loader = build_loader(root, "train", batch_size=4, views=2, preset="default", image_size=16, num_threads=1)
    loader.set_epoch(epoch)
    return loader


@pytest.mark.slow  # four pipeline builds: over 10 s on a loaded 2-core machine
def test_state_restores_the_rest_of_the_epoch_without_replay(tiny_dataset):
    loader = _loader(tiny_dataset)
    full, state = [], None
    for b, (x, y) in enumerate(loader.iter_from(0)):
        full.append((x.clone(), y.clone()))
        if b == 6:
            state = loader.state_dict(7)  # the consumer holds batch 6: seven batches handed out
    assert loader.state_dict(3) is None  # not where the epoch is: nothing saved rather than a wrong state
    assert state is not None and isinstance(state["checkpoint"], (bytes, str))
    resumed = _loader(tiny_dataset)
    rest = list(resumed.iter_from(7, state))
    assert resumed.replayed == 0 and len(rest) == len(full) - 7
    for (x, y), (x2, y2) in zip(full[7:], rest):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # without a state, or with one from another position, the loader replays: the same batches
    for other in (None, {**state, "batch": 6}, {**state, "epoch": 0}):
        again = _loader(tiny_dataset)
        rest = list(again.iter_from(7, other))
        assert again.replayed == 7
        assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(full[7:], rest))


@pytest.mark.slow
def test_trainer_resume_restores_the_loader_state(tmp_path, tiny_dataset, monkeypatch):
    """The real trainer: the checkpoint holds the loader state, the resumed run replays nothing and
    logs the uninterrupted run's losses."""
    from ensiam_fast import train
    from ensiam_fast.checkpoint import latest_checkpoint
    from ensiam_fast.data.dali import DaliLoader

    loaders = []
    original = DaliLoader.iter_from

    def spy(self, start_batch, state=None):
        loaders.append((self, start_batch, state is not None))
        return original(self, start_batch, state)

    monkeypatch.setattr(DaliLoader, "iter_from", spy)
    run = ["--config", "demo", f"data.root={tiny_dataset}", "batch_size=8", "log_every=1", "knn_every=0",
           "data.image_size=16", "data.num_threads=1", "model.proj_hidden=32", "model.proj_dim=32",
           "model.pred_hidden=8", "model.channels_last=false", "optim.warmup_epochs=1",
           "mixed_precision=no"]  # fmt: skip
    assert train.main([*run, f"output_dir={tmp_path / 'whole'}", "max_steps=5"]) == 0
    assert train.main([*run, f"output_dir={tmp_path / 'split'}", "max_steps=3"]) == 0
    _, state = latest_checkpoint(tmp_path / "split")
    assert state["batch_in_epoch"] == 3 and state["loader"][0]["batch"] == 3
    loaders.clear()
    assert train.main([*run, f"output_dir={tmp_path / 'split'}", "max_steps=5"]) == 0
    loader, start, restored = loaders[0]
    assert (start, restored, loader.replayed) == (3, True, 0)

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses("split") == pytest.approx(losses("whole"), rel=1e-6, abs=1e-7)
