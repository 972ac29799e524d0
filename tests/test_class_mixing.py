"""Class-sorted sources become class-mixed shards: the global shuffle at conversion, seen through the
real DALI loader and through ``make_shards --verify``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ensiam_fast.data.dali as dali_loader
from ensiam_fast.data import build_loader, dali_available
from ensiam_fast.shards.cli import main as make_shards
from ensiam_fast.shards.format import shard_name, write_shard
from ensiam_fast.shards.manifest import Manifest, SplitInfo, write_manifest
from ensiam_fast.shards.verify import expected_classes, verify_dataset

CLASSES, PER_CLASS, SHARD, BATCH = 16, 40, 64, 32
# The loader's shuffle buffer scaled down with the dataset (2,048 of 1.28M ImageNet samples is
# 0.16%; here 64 of 640), so that only the order on disk can mix the classes of a batch.
BUFFER = 64


@pytest.fixture(scope="module")
def sorted_source(tmp_path_factory) -> Path:
    """An image folder listed class by class, as Tiny-ImageNet and ImageNet are."""
    root = tmp_path_factory.mktemp("sorted_src")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        folder = root / "train" / f"c{c:02d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def write_class_sorted(root: Path, src: Path) -> Path:
    """The same images in source order (what conversion wrote before the global shuffle)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = sorted((src / "train").glob("*/*.png"))
    labels = [int(p.parent.name[1:]) for p in paths]
    names, sizes = [], []
    for s in range(0, len(paths), SHARD):
        samples = [
            (f"train_{i:08d}", {"png": paths[i].read_bytes(), "cls": str(labels[i]).encode()})
            for i in range(s, min(s + SHARD, len(paths)))
        ]
        rec = write_shard(root / shard_name("train", s // SHARD), samples)
        names.append(rec.name)
        sizes.append(rec.num_samples)
    classes = [f"c{c:02d}" for c in range(CLASSES)]
    split = SplitInfo(num_samples=len(paths), shards=names, labeled=True, shard_sizes=sizes)
    write_manifest(root, Manifest("sorted", classes, {"train": split}, image_size=[32, 32]))
    return root


def classes_per_batch(root: Path, monkeypatch) -> float:
    monkeypatch.setattr(dali_loader, "SHUFFLE_BUFFER", BUFFER)
    loader = build_loader(root, "train", batch_size=BATCH, views=1, preset="eval", seed=1, num_threads=1)
    counts = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        counts += [len(set(y.tolist())) for _, y in loader]
    return float(np.mean(counts))


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_class_sorted_source_gives_class_mixed_batches(sorted_source, tmp_path, monkeypatch):
    random_sampling = expected_classes([PER_CLASS] * CLASSES, BATCH)  # 13.97 of 16
    out = tmp_path / "converted"
    assert (
        make_shards(
            [
                "--dataset",
                "imagefolder",
                "--src",
                str(sorted_source),
                "--out",
                str(out),
                "--format",
                "png",
                "--shard-size",
                str(SHARD),
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    # Sizing: a batch of 32 drawn at random from 16 classes x 40 holds 14.0 classes, SD 1.1
    # (simulated), so the mean over 2 epochs x 20 batches has an SE of about 0.18 and the bound 0.9 x
    # 13.97 = 12.6 is 8 SE below it. One epoch would do (5.6 SE), but a second costs under a second.
    mixed = classes_per_batch(out, monkeypatch)
    assert mixed >= 0.9 * random_sampling, (mixed, random_sampling)
    # The same images in source order through the same loader: what the check above guards against.
    unmixed = classes_per_batch(write_class_sorted(tmp_path / "sorted", sorted_source), monkeypatch)
    assert unmixed < 0.5 * random_sampling, (unmixed, random_sampling)


def test_verify_reports_mixing_and_warns_on_class_sorted_shards(sorted_source, tmp_path, capsys):
    out = tmp_path / "converted"
    assert (
        make_shards(
            [
                "--dataset",
                "imagefolder",
                "--src",
                str(sorted_source),
                "--out",
                str(out),
                "--shard-size",
                str(SHARD),
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    report = verify_dataset(out, decode=False)
    observed, expected = report.mixing["train"]
    # Sizing: 64 random images hold 15.8 of the 16 classes, SD 0.44 (simulated); the mean over 10
    # shards has an SE of 0.14, so the bound 0.9 x expected is 11 SE below and class-sorted shards
    # (2.4 classes) are far under it.
    assert report.ok and not report.warnings
    assert abs(expected - expected_classes([PER_CLASS] * CLASSES, SHARD)) < 1e-9
    assert observed >= 0.9 * expected

    sorted_root = write_class_sorted(tmp_path / "sorted", sorted_source)
    assert make_shards(["--verify", str(sorted_root)]) == 0  # a warning, not a failure
    captured = capsys.readouterr()
    assert "split train: 2.4 classes per shard on average (random order: 15.8)" in captured.out
    assert "warning: split 'train' looks class-sorted" in captured.err
