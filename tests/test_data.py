"""ensiam_fast.data: the loader contract on the DALI CPU backend (tiny shard datasets)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ensiam_fast.data.dali as data
import ensiam_fast.data.loader as loader_module
from ensiam_fast.data import build_loader, normalize
from ensiam_fast.shards import (
    Manifest,
    ShardFormatError,
    SplitInfo,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from ensiam_fast.shards.format import parse_labels
from pipelines.presets import MEAN, STD, get_preset

# No pixel randomness (crop=False, resize_ratio 1 on 32x32 images): a view is the decoded image, so
# every output can be traced back to its source sample, while train=True still shuffles.
IDENTITY = get_preset("eval").replace(name="identity")


def source_samples(root: Path, split: str) -> tuple[dict[bytes, int], list[int]]:
    """PIL-decoded images of a split (HWC bytes -> position in manifest order) and their labels."""
    manifest = read_manifest(root)
    by_pixels, labels = {}, []
    for name in manifest.split(split).shards:
        with tarfile.open(root / name) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for member in sorted(k for k in members if k.endswith((".jpg", ".png"))):
            key = member.rsplit(".", 1)[0]
            pixels = np.asarray(Image.open(io.BytesIO(members[member])).convert("RGB"))
            by_pixels[pixels.tobytes()] = len(labels)
            labels.append(int(members[f"{key}.cls"]) if f"{key}.cls" in members else -1)
    return by_pixels, labels


def identify(x: torch.Tensor, by_pixels: dict[bytes, int]) -> list[int]:
    """Source positions of the first view of a batch (each must be an untouched source image)."""
    return [by_pixels[img.permute(1, 2, 0).contiguous().numpy().tobytes()] for img in x[0]]


def epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def write_dataset(root: Path, images: list, labels: list[int] | None, *, ext: str = "png", shard_size: int = 4):
    """A one-split ('train') dataset from arrays (encoded as ext) or raw bytes."""
    root.mkdir(parents=True, exist_ok=True)
    names, sizes = [], []
    for s, start in enumerate(range(0, len(images), shard_size)):
        samples = []
        for i in range(start, min(len(images), start + shard_size)):
            img = images[i]
            if isinstance(img, np.ndarray):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG" if ext == "png" else "JPEG", quality=95)
                img = buf.getvalue()
            parts = {ext: img}
            if labels is not None:
                parts["cls"] = str(labels[i]).encode()
            samples.append((f"s{i:05d}", parts))
        rec = write_shard(root / shard_name("train", s), samples)
        names.append(rec.name)
        sizes.append(rec.num_samples)
    info = SplitInfo(num_samples=len(images), shards=names, labeled=labels is not None, shard_sizes=sizes)
    write_manifest(root, Manifest(dataset="t", classes=[str(c) for c in range(20000)], splits={"train": info},
                                  image_size=[32, 32]))  # fmt: skip
    return root


def test_shapes_dtypes_and_attributes(tiny_dataset):
    loader = build_loader(tiny_dataset, "train", batch_size=8, views=3, preset="default")
    assert (len(loader), loader.num_samples, loader.batch_size, loader.views) == (6, 48, 8, 3)
    assert (loader.num_classes, loader.labeled) == (12, True)
    batches = epoch(loader)
    assert len(batches) == 6
    x, y = batches[0]
    assert x.shape == (3, 8, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.shape == (8,) and y.dtype == torch.int64 and x.device.type == y.device.type == "cpu"


def test_same_seed_same_batches_and_resume_equals_tail(tiny_dataset):
    kw = dict(batch_size=8, views=2, preset="default", seed=5)
    a = build_loader(tiny_dataset, "train", **kw)
    b = build_loader(tiny_dataset, "train", **kw)
    first = epoch(a)
    for (xa, ya), (xb, yb) in zip(first, epoch(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    tail = list(a.iter_from(4))  # same epoch again, resumed at batch 4
    assert len(tail) == 2
    for (xt, yt), (xf, yf) in zip(tail, first[4:]):
        assert torch.equal(xt, xf) and torch.equal(yt, yf)
    a.set_epoch(3)
    b.set_epoch(3)
    full3 = epoch(a)
    for (xt, yt), (xf, yf) in zip(b.iter_from(1), full3[1:]):
        assert torch.equal(xt, xf) and torch.equal(yt, yf)


def test_epochs_and_seeds_differ(tiny_dataset):
    kw = dict(batch_size=8, views=2, preset="default")
    loader = build_loader(tiny_dataset, "train", seed=0, **kw)
    e0 = epoch(loader)
    loader.set_epoch(1)
    e1 = epoch(loader)
    other = epoch(build_loader(tiny_dataset, "train", seed=1, **kw))
    for a, b in ((e0, e1), (e0, other)):
        assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in b]))
        assert not torch.equal(a[0][0], b[0][0])


def test_train_epoch_is_a_shuffled_permutation_with_exact_labels(tiny_dataset):
    by_pixels, labels = source_samples(tiny_dataset, "train")
    loader = build_loader(tiny_dataset, "train", batch_size=8, views=1, preset=IDENTITY, seed=2)
    orders = []
    for e in range(2):
        loader.set_epoch(e)
        order = []
        for x, y in loader:
            ids = identify(x, by_pixels)
            assert y.tolist() == [labels[i] for i in ids]  # labels up to 11: two-digit .cls
            order += ids
        assert sorted(order) == list(range(48))
        orders.append(order)
    assert orders[0] != list(range(48)), "the first epoch is already shuffled"
    assert orders[0] != orders[1]
    # the shuffle reaches across tars: the first batch is not drawn from the first tar only
    assert any(max(o[:8]) >= 16 for o in orders)


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_eval_shards_cover_every_sample_exactly_once_as_decoded(tiny_dataset, num_shards):
    by_pixels, labels = source_samples(tiny_dataset, "test")
    seen = []
    for shard_id in range(num_shards):
        loader = build_loader(tiny_dataset, "test", batch_size=5, views=1, preset="default", train=False,
                              shard_id=shard_id, num_shards=num_shards)  # fmt: skip
        ids = []
        batches = epoch(loader)
        assert len(batches) == len(loader) == -(-loader.num_samples // 5)
        for x, y in batches:
            ids += identify(x, by_pixels)  # eval output == the decoded image, pixel for pixel
            assert y.tolist() == [labels[i] for i in ids[-len(y) :]]
        assert len(ids) == loader.num_samples and ids == sorted(ids)
        seen += ids
    assert sorted(seen) == list(range(24))


def test_train_shards_are_disjoint_every_epoch(tiny_dataset):
    by_pixels, _ = source_samples(tiny_dataset, "train")
    loaders = [
        build_loader(tiny_dataset, "train", batch_size=6, views=1, preset=IDENTITY, shard_id=r, num_shards=2)
        for r in range(2)
    ]
    for e in range(2):
        per_rank = []
        for loader in loaders:
            loader.set_epoch(e)
            ids = [i for x, _ in loader for i in identify(x, by_pixels)]
            assert len(ids) == len(set(ids)) == 24
            per_rank.append(set(ids))
        assert not per_rank[0] & per_rank[1]
        assert per_rank[0] | per_rank[1] == set(range(48))


def test_multi_digit_labels_and_png_are_exact(tmp_path):
    rng = np.random.default_rng(0)
    labels = [0, 7, 10, 99, 522, 999, 1000, 12345, 3, 42]
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in labels]
    root = write_dataset(tmp_path / "png", images, labels, ext="png", shard_size=4)
    loader = build_loader(root, "train", batch_size=4, views=1, preset="eval", train=False)
    xs, ys = zip(*epoch(loader))
    assert torch.cat(ys).tolist() == labels
    got = torch.cat([x[0] for x in xs]).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, np.stack(images))  # lossless in, lossless out


def test_parse_labels():
    raw = np.zeros((4, 4), dtype=np.uint8)
    for i, text in enumerate([b"7", b"522", b"10\n", b" 3"]):
        raw[i, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    assert parse_labels(raw).tolist() == [7, 522, 10, 3]
    raw[1, :2] = np.frombuffer(b"x1", dtype=np.uint8)
    with pytest.raises(ShardFormatError, match="not an ASCII decimal"):
        parse_labels(raw)
    with pytest.raises(ShardFormatError, match="empty .cls"):
        parse_labels(np.zeros((3, 0), dtype=np.uint8))


def test_unlabeled_split_gives_minus_one(tiny_dataset):
    loader = build_loader(tiny_dataset, "unlabeled", batch_size=8, views=2, preset="strong")
    assert not loader.labeled and len(loader) == 4
    for _, y in loader:
        assert y.tolist() == [-1] * 8


def test_normalize_matches_formula_and_channels_last():
    x = torch.randint(0, 256, (2, 3, 3, 4, 5), dtype=torch.uint8)
    want = (x.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    for channels_last in (False, True):
        y = normalize(x, channels_last=channels_last)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert torch.allclose(y, want, atol=1e-5)
        assert y.flatten(0, 1).is_contiguous(memory_format=torch.channels_last) == channels_last
    assert normalize(x, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(views=0), ValueError, r"views \(K\) must be an integer in 1\.\.16"),
        (dict(views=17), ValueError, r"1\.\.16"),
        (dict(preset="defualt"), ValueError, "unknown augmentation preset 'defualt'.*did you mean default"),
        (dict(split="val"), ShardFormatError, "has no split 'val'"),
        (dict(preset="very_strong", image_size=30), ValueError, "30 is not divisible by the jigsaw grid 4"),
        (dict(batch_size=25, num_shards=2), ValueError, "batch_size 25 is larger than the 24 samples"),
        (dict(shard_id=2, num_shards=2), ValueError, "shard_id < num_shards"),
        (dict(device="tpu"), ValueError, "device must be"),
        (dict(backend="jax"), ValueError, "backend must be 'dali' or 'torch'"),
    ],
)
def test_bad_arguments_fail_clearly(tiny_dataset, kwargs, error, match):
    args = dict(split="train", batch_size=8, views=2, preset="default") | kwargs
    split = args.pop("split")
    with pytest.raises(error, match=match):
        build_loader(tiny_dataset, split, **args)


def test_evaluation_batch_larger_than_split_is_one_short_batch(tiny_dataset):
    loader = build_loader(tiny_dataset, "test", batch_size=25, views=1, preset="eval", train=False)
    batches = list(loader)
    assert len(loader) == 1 and [y.shape[0] for _, y in batches] == [24]
    assert sorted(batches[0][1].tolist()) == sorted(i % 12 for i in range(24))


def test_directory_without_manifest(tmp_path):
    with pytest.raises(ShardFormatError, match="manifest.json is missing.*make_shards.py"):
        build_loader(tmp_path, "train", batch_size=2, views=1, preset="default")


@pytest.mark.parametrize("writable", [True, False])
def test_missing_index_is_regenerated(tiny_dataset, tmp_path, monkeypatch, writable):
    root = Path(shutil.copytree(tiny_dataset, tmp_path / "copy"))
    idx = root / "train-000001.idx"
    original = idx.read_text()
    idx.unlink()
    if not writable:  # as root every directory is writable: pretend it is not
        monkeypatch.setattr(data.os, "access", lambda path, mode: False)
    with pytest.warns(UserWarning, match="train-000001.idx is missing; regenerating it"):
        loader = build_loader(root, "train", batch_size=8, views=1, preset=IDENTITY)
    assert sum(len(y) for _, y in loader) == 48
    if writable:
        assert idx.read_text() == original
    else:
        assert not idx.exists()


def test_corrupt_image_names_shard_and_verify(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
    root = write_dataset(tmp_path / "bad", images, list(range(8)), ext="jpg", shard_size=4)
    good = (root / "train-000001.tar").read_bytes()
    # overwrite the entropy-coded middle of the second shard's second JPEG (s00005) with markers
    at = good.index(b"\xff\xd8", 512 * 2 + 2 * 1024) + 600
    (root / "train-000001.tar").write_bytes(good[:at] + b"\xff\xd9" * 40 + good[at + 80 :])
    # found before DALI decodes it (DALI 2.4's CPU decoder can crash the process on it)
    with pytest.raises(
        ShardFormatError,
        match=r"shard .*train-000001\.tar, sample 's00005': the image does not decode.*make_shards\.py --verify "
        r".* --drop-corrupt",
    ):
        build_loader(root, "train", batch_size=4, views=1, preset="eval", train=False)


def test_torch_backend_dispatch_and_fallback(tiny_dataset, monkeypatch):
    import ensiam_fast.data.torch as torch_loader

    calls = []
    monkeypatch.setattr(torch_loader, "reference_loader", lambda spec, **kw: calls.append(spec))
    build_loader(tiny_dataset, "train", batch_size=8, views=2, preset="strong", seed=4, backend="torch")
    assert calls[-1].split.name == "train" and calls[-1].seed == 4 and calls[-1].views == 2
    monkeypatch.setattr(loader_module, "dali_available", lambda: False)
    with pytest.warns(UserWarning, match="DALI is not importable"):
        build_loader(tiny_dataset, "test", batch_size=8, views=1, preset="eval", train=False)
    assert calls[-1].split.name == "test" and calls[-1].train is False


def test_next_epoch_built_ahead_is_identical_to_one_built_on_the_spot(tiny_dataset):
    kw = dict(batch_size=8, views=2, preset="default", seed=11)
    ahead = build_loader(tiny_dataset, "train", **kw)
    spot = build_loader(tiny_dataset, "train", **kw)
    spot.build_ahead = False
    for e in range(3):
        ahead.set_epoch(e)
        spot.set_epoch(e)
        assert ahead.last_built_ahead == (e > 0) and not spot.last_built_ahead
        for (xa, ya), (xs, ys) in zip(epoch(ahead), epoch(spot), strict=True):
            assert torch.equal(xa, xs) and torch.equal(ya, ys)
    # a jump to another epoch (resume) builds on the spot, and still matches
    ahead.set_epoch(7)
    spot.set_epoch(7)
    assert not ahead.last_built_ahead
    for (xa, _), (xs, _) in zip(ahead.iter_from(2), spot.iter_from(2), strict=True):
        assert torch.equal(xa, xs)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_unshuffled_training_loader_keeps_the_images_and_redraws_the_views(tiny_dataset, backend):
    """shuffle=False (the gradient-variance analysis): every epoch reads the stored order, and a
    training preset still draws fresh augmentations per epoch."""
    by_pixels, labels = source_samples(tiny_dataset, "train")
    kw = dict(batch_size=8, views=2, seed=3, shuffle=False, backend=backend, num_threads=0 if backend == "torch" else 1)
    fixed = build_loader(tiny_dataset, "train", preset=IDENTITY, **kw)
    for e in (0, 5):
        fixed.set_epoch(e)
        order = [i for x, _ in fixed for i in identify(x, by_pixels)]
        assert order == list(range(48))
    augmented = build_loader(tiny_dataset, "train", preset="default", **kw)
    firsts = []
    for e in (0, 1):
        augmented.set_epoch(e)
        firsts.append(next(iter(augmented)))
    (x0, y0), (x1, y1) = firsts
    assert y0.tolist() == y1.tolist() == labels[:8]
    assert not torch.equal(x0, x1)
    with pytest.raises(ValueError, match="shuffle=True needs train=True"):
        build_loader(
            tiny_dataset, "test", batch_size=8, views=1, preset="eval", train=False, shuffle=True, backend=backend
        )
