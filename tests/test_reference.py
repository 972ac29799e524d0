"""The torchvision loader (ensiam_fast/data/torch.py) and the reference augmentations (pipelines/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ensiam_fast.data.torch import build_reference_loader, shuffle_buffer_order
from ensiam_fast.shards import ShardFormatError
from pipelines.presets import get_preset
from pipelines.reference import ViewAugment, blur_kernel_size, jigsaw

NUM_TRAIN, NUM_TEST, NUM_CLASSES = 48, 24, 12


def run(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def build(root, split="train", **kw):
    args = dict(batch_size=8, views=2, preset="default", num_threads=0, seed=3)
    args.update(kw)
    return build_reference_loader(root, split, **args)


def test_train_shapes_dtypes_and_len(tiny_dataset):
    loader = build(tiny_dataset, views=3, batch_size=10)
    batches = run(loader)
    assert len(loader) == NUM_TRAIN // 10 == len(batches)  # last partial batch dropped
    assert loader.num_samples == NUM_TRAIN and loader.batch_size == 10 and loader.views == 3
    assert loader.num_classes == NUM_CLASSES and loader.labeled
    for x, y in batches:
        assert x.shape == (3, 10, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
        assert y.shape == (10,) and y.dtype == torch.int64


def test_unlabeled_split_gives_minus_one(tiny_dataset):
    loader = build(tiny_dataset, "unlabeled")
    assert not loader.labeled
    assert all((y == -1).all() for _, y in loader)


def test_deterministic_for_a_seed_and_independent_of_workers(tiny_dataset):
    a = run(build(tiny_dataset, preset="very_strong", seed=5))
    b = run(build(tiny_dataset, preset="very_strong", seed=5, num_threads=2))
    c = run(build(tiny_dataset, preset="very_strong", seed=6))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_epochs_differ_and_first_epoch_is_shuffled(tiny_dataset):
    loader = build(tiny_dataset)
    e0 = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    e1 = torch.cat([y for _, y in loader])
    sequential = torch.arange(NUM_TRAIN) % NUM_CLASSES
    assert not torch.equal(e0, sequential)
    assert not torch.equal(e0, e1)
    # each epoch is a permutation of the split (48 samples, 6 batches of 8: nothing dropped)
    assert torch.equal(e0.sort().values, sequential.sort().values)
    assert torch.equal(e1.sort().values, sequential.sort().values)


def test_views_of_one_image_differ(tiny_dataset):
    x, _ = next(iter(build(tiny_dataset, views=2)))
    assert not torch.equal(x[0], x[1])


def test_iter_from_matches_the_full_epoch(tiny_dataset):
    loader = build(tiny_dataset, preset="strong", num_threads=2)
    loader.set_epoch(2)
    full = run(loader)
    tail = run(loader.iter_from(4))
    assert len(tail) == len(full) - 4
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(full[4:], tail))


def test_train_ranks_are_disjoint_and_equal_length(tiny_dataset):
    # eval views are deterministic pixels, so use them to identify samples seen by each rank in train mode
    ident = {
        tuple(x[0, j].flatten()[:64].tolist())
        for x, _ in build(tiny_dataset, train=False, views=1)
        for j in range(x.shape[1])
    }
    assert len(ident) == NUM_TRAIN
    loaders = [build(tiny_dataset, batch_size=4, shard_id=r, num_shards=3, seed=1) for r in range(3)]
    assert len({len(ld) for ld in loaders}) == 1 and len(loaders[0]) == NUM_TRAIN // 3 // 4
    seen = [torch.cat([y for _, y in ld]) for ld in loaders]
    assert sum(len(s) for s in seen) == NUM_TRAIN
    # labels are 0..11 four times each; disjoint ranks together give back that multiset exactly
    assert torch.equal(torch.cat(seen).sort().values, (torch.arange(NUM_TRAIN) % NUM_CLASSES).sort().values)


def test_eval_gives_every_sample_exactly_once_across_shards(tiny_dataset):
    whole = run(build(tiny_dataset, "test", train=False, batch_size=5, views=1))
    assert [x.shape[1] for x, _ in whole] == [5, 5, 5, 5, 4]  # last batch smaller, nothing dropped
    parts = [
        run(build(tiny_dataset, "test", train=False, batch_size=5, views=1, shard_id=r, num_shards=3)) for r in range(3)
    ]
    x_all = torch.cat([x for x, _ in whole], dim=1)
    x_parts = torch.cat([x for part in parts for x, _ in part], dim=1)
    assert torch.equal(x_all, x_parts)
    # labels come back in sample order, multi-digit ones (10, 11) included
    y_parts = torch.cat([y for part in parts for _, y in part])
    assert torch.equal(y_parts, torch.arange(NUM_TEST) % NUM_CLASSES)
    assert run(build(tiny_dataset, "test", train=False, views=1))[0][0].shape[0] == 1


def test_eval_is_deterministic_and_ignores_train_presets(tiny_dataset):
    a = run(build(tiny_dataset, "test", train=False, preset="very_strong", seed=1))
    b = run(build(tiny_dataset, "test", train=False, preset="default", seed=2))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    assert torch.equal(a[0][0][0], a[0][0][1])  # the K eval views are the same picture


def test_eval_preset_on_native_size_is_the_decoded_image(tiny_dataset):
    import webdataset as wds

    from ensiam_fast.data.torch import decode_rgb
    from ensiam_fast.shards import shard_paths

    tars, _ = shard_paths(tiny_dataset, "test")
    first = next(iter(wds.tarfile_samples([{"url": tars[0]}])))
    x, _ = next(iter(build(tiny_dataset, "test", train=False, views=1)))
    assert torch.equal(x[0, 0], decode_rgb(first["jpg"], "test"))


def test_image_size_option_resizes(tiny_dataset):
    x, _ = next(iter(build(tiny_dataset, image_size=16)))
    assert x.shape[-2:] == (16, 16)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(views=0), "views"),
        (dict(views=17), "views"),
        (dict(batch_size=49), "batch_size 49"),
        (dict(preset="defualt"), "did you mean default"),
        (dict(shard_id=2, num_shards=2), "shard_id"),
    ],
)
def test_bad_arguments_fail_clearly(tiny_dataset, kw, match):
    with pytest.raises(ValueError, match=match):
        build(tiny_dataset, **kw)


def test_missing_split_names_the_choices(tiny_dataset):
    with pytest.raises(ShardFormatError, match="no split 'val'"):
        build(tiny_dataset, "val")


def test_jigsaw_keeps_the_tiles_and_moves_them():
    img = torch.arange(3 * 8 * 8, dtype=torch.int64).reshape(3, 8, 8)
    out = jigsaw(img, 4, torch.Generator().manual_seed(0))

    def tiles(t):
        return sorted(
            tuple(t[:, i : i + 2, j : j + 2].flatten().tolist()) for i in range(0, 8, 2) for j in range(0, 8, 2)
        )

    assert tiles(out) == tiles(img)
    assert not torch.equal(out, img)
    # a tile moves as a whole, all channels together
    assert out[:, :2, :2].flatten().tolist() in [
        img[:, i : i + 2, j : j + 2].flatten().tolist() for i in range(0, 8, 2) for j in range(0, 8, 2)
    ]


def test_jigsaw_moves_tiles_uniformly_and_leaves_the_remainder():
    img = torch.arange(10 * 10).reshape(1, 10, 10)
    gen = torch.Generator().manual_seed(1)
    stays = 0
    for _ in range(400):
        out = jigsaw(img, 3, gen)
        assert torch.equal(out[:, 9, :], img[:, 9, :]) and torch.equal(out[:, :, 9], img[:, :, 9])
        stays += int(torch.equal(out[:, :3, :3], img[:, :3, :3]))
    # the top-left tile stays with probability 1/9: 400 draws give 44 +- 6.3 (one sd)
    assert 44 - 4 * 6.3 < stays < 44 + 4 * 6.3


def test_blur_kernel_size_follows_sigma_and_fits_the_image():
    assert blur_kernel_size(0.1, 224) == 3
    assert blur_kernel_size(2.0, 224) == 13
    assert blur_kernel_size(3.0, 8) == 7
    assert blur_kernel_size(1.0, 32) % 2 == 1


def test_shuffle_buffer_is_a_permutation():
    stream = np.arange(1000)
    out = shuffle_buffer_order(stream, 64, np.random.default_rng(0))
    assert sorted(out.tolist()) == stream.tolist() and not np.array_equal(out, stream)


def test_view_augment_honours_single_fields():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    off = dict(crop=False, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    assert torch.equal(ViewAugment(get_preset("default", **off), 16)(img), img)
    flipped = ViewAugment(get_preset("default", **{**off, "flip_p": 1.0}), 16)(img)
    assert torch.equal(flipped, img.flip(-1))
    gray = ViewAugment(get_preset("default", **{**off, "grayscale_p": 1.0}), 16)(img)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    blurred = ViewAugment(get_preset("default", **{**off, "blur_p": 1.0, "blur_sigma": (1.0, 1.0)}), 16)(img)
    assert blurred.float().std() < 0.6 * img.float().std()
    jig = ViewAugment(get_preset("default", **{**off, "jigsaw_grid": 2}), 16)(img)
    assert sorted(jig.flatten().tolist()) == sorted(img.flatten().tolist())
    ra = ViewAugment(get_preset("default", **{**off, "randaugment_n": 2, "randaugment_m": 9}), 16)
    assert ra.randaugment.num_ops == 2 and ra.randaugment.magnitude == 9
    assert ra.randaugment.num_magnitude_bins == 31


@pytest.mark.parametrize("size, kernel, sigma", [(32, 13, 2.0), (32, 3, 0.1), (64, 7, 1.1)])
def test_separable_blur_matches_torchvision(size, kernel, sigma):
    import torchvision.transforms.v2.functional as TF

    from pipelines.reference import gaussian_blur

    img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = gaussian_blur(img, kernel, sigma).int()
    theirs = TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma]).int()
    # float summation order differs, so a value may round the other way (off by one), rarely
    assert (ours - theirs).abs().max() <= 1 and (ours != theirs).float().mean() < 1e-3
