"""Splits joined with '+' (``data.split=train+unlabeled``, evaluation splits too) read as one split."""

from __future__ import annotations

import json

import pytest
import torch

from ensiam_fast import evaluate, train
from ensiam_fast.config import load_config
from ensiam_fast.data import build_loader
from ensiam_fast.run_checks import check_data
from ensiam_fast.shards import ShardFormatError, read_manifest

TINY = [
    "batch_size=8", "epochs=1", "log_every=1", "checkpoint_every=1000", "knn_k=5", "eval_batch_size=16",
    "data.image_size=16", "data.num_threads=1", "model.proj_hidden=32", "model.proj_dim=32",
    "model.pred_hidden=8", "model.channels_last=false", "model.cifar_stem=true", "optim.warmup_epochs=1",
    "mixed_precision=no",
]  # fmt: skip


def test_manifest_joins_splits_in_the_order_named(tiny_dataset):
    m = read_manifest(tiny_dataset)
    both = m.split("unlabeled+train")
    assert both.num_samples == 32 + 48 and not both.labeled  # labelled only when every part is
    assert both.shards == m.splits["unlabeled"].shards + m.splits["train"].shards
    assert both.shard_sizes == m.splits["unlabeled"].shard_sizes + m.splits["train"].shard_sizes
    assert m.split("train+test").labeled
    with pytest.raises(ShardFormatError, match="has no split 'val'.*join several with '\\+'"):
        m.split("train+val")
    with pytest.raises(ShardFormatError, match="names a split twice"):
        m.split("train+train")


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_both_loaders_read_every_sample_of_a_joined_split_once(tiny_dataset, backend):
    kw = dict(batch_size=16, views=1, preset="eval", train=False, image_size=16, num_threads=1, backend=backend)
    parts = {s: torch.cat([y for _, y in build_loader(tiny_dataset, s, **kw)]) for s in ("train", "test")}
    joined = torch.cat([y for _, y in build_loader(tiny_dataset, "train+test", **kw)])
    assert torch.equal(joined, torch.cat([parts["train"], parts["test"]]))
    unl = build_loader(tiny_dataset, "train+unlabeled", **kw)
    assert not unl.labeled and unl.num_samples == 80
    y = torch.cat([y for _, y in unl])
    assert y.shape == (80,) and (y == -1).all()
    # training: every rank's epoch draws from all 80 samples (the tars of both parts are shuffled together)
    loader = build_loader(tiny_dataset, "train+unlabeled", batch_size=8, views=2, preset="default", seed=1,
                          image_size=16, num_threads=1, backend=backend)  # fmt: skip
    assert len(loader) == 80 // 8


@pytest.mark.slow  # a trainer run (joined splits in the fast suite: the loader tests above)
def test_the_trainer_pretrains_on_a_joined_split_and_the_monitor_scores_one(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", "demo", f"output_dir={out}", f"data.root={tiny_dataset}", *TINY, "max_steps=2",
            "knn_every=1", "data.split=train+unlabeled", "data.knn_train_split=train+test"]  # fmt: skip
    assert train.main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["knn_samples"] for r in records if "knn_samples" in r] == [24, 24]
    assert load_config(out / "config.yaml").data.split == "train+unlabeled"
    # a joined evaluation split works on the command line too; an unlabelled part is refused, named
    assert evaluate.main(["knn", "--run", str(out), "--train-split", "train+test", "--quiet"]) == 0
    capsys.readouterr()
    assert evaluate.main(["knn", "--run", str(out), "--train-split", "train+unlabeled", "--quiet"]) == 2
    assert "error: split 'train+unlabeled' of" in capsys.readouterr().err


def test_stl10_preset_pretrains_on_train_and_unlabeled(tmp_path):
    from conftest import make_tiny_dataset

    root = make_tiny_dataset(tmp_path / "stl", {"train": (20, True), "test": (8, True), "unlabeled": (40, False)},
                             size=96, shard_size=20)  # fmt: skip
    cfg = load_config("stl10", [f"data.root={root}", "batch_size=8"])
    assert cfg.data.split == "train+unlabeled"
    assert check_data(cfg, num_processes=1)["num_samples"] == 60
