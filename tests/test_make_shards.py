"""tools/make_shards.py end to end: fake datasets in each real on-disk layout, converted and read back
with webdataset and DALI; verification, resume, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import ensiam_fast.shards.convert as convert
from ensiam_fast.shards.encode import encode_png
from ensiam_fast.shards.manifest import read_manifest, shard_paths
from ensiam_fast.shards.sources import digits_arrays, stratified_split
from ensiam_fast.shards.verify import verify_dataset

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "make_shards.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_shards_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shards = _load_tool()


def run(*argv) -> int:
    return make_shards.main([*map(str, argv), "--workers", "1", "--quiet"])


def smooth_images(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Smooth colour gradients: JPEG keeps them within a few levels, so the tolerance stays tight."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(40, 200, 3)
        fx, fy = rng.uniform(0.5, 2, 2)
        out[i, ..., 0] = a + 50 * np.sin(np.pi * fx * xx)
        out[i, ..., 1] = b + 50 * np.cos(np.pi * fy * yy)
        out[i, ..., 2] = c + 40 * (xx - yy)
    return out


# --------------------------------------------------------------------------- fake sources


def write_cifar10(parent: Path, rng: np.random.Generator, per_batch: int = 3) -> dict:
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    expected = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = smooth_images(rng, per_batch, 32, 32)
        labels = rng.integers(0, 10, per_batch).tolist()
        # The real release: bytes keys, rows of R, G, B planes.
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": images.transpose(0, 3, 1, 2).reshape(per_batch, -1),
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        (root / name).write_bytes(pickle.dumps(batch))
        split = "test" if name == "test_batch" else "train"
        expected[split][0].extend(images)
        expected[split][1].extend(labels)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}))
    return expected


def write_cifar100(parent: Path, rng: np.random.Generator) -> dict:
    root = parent / "cifar-100-python"
    root.mkdir(parents=True)
    expected = {}
    for split, fine in (("train", [99, 10, 57, 3, 42, 93]), ("test", [12, 99, 0, 57])):
        n = len(fine)
        images = smooth_images(rng, n, 32, 32)
        batch = {
            "data": images.transpose(0, 3, 1, 2).reshape(n, -1),
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
        }  # str keys, as a Python 3 re-pickle has
        (root / split).write_bytes(pickle.dumps(batch))
        expected[split] = (list(images), fine)
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    (root / "meta").write_bytes(pickle.dumps(meta))
    return expected


def write_stl10(parent: Path, rng: np.random.Generator) -> dict:
    root = parent / "stl10_binary"
    root.mkdir(parents=True)
    expected = {}
    for split, n in (("train", 3), ("test", 2), ("unlabeled", 2)):
        images = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        # On disk: per image, per channel, column-major.
        (root / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())
        labels = None
        if split != "unlabeled":
            labels = rng.integers(1, 11, n).astype(np.uint8)
            labels[0] = 10
            (root / f"{split}_y.bin").write_bytes(labels.tobytes())
            labels = [int(v) - 1 for v in labels]
        expected[split] = (list(images), labels)
    (root / "class_names.txt").write_text("\n".join(f"stl{i}" for i in range(10)) + "\n")
    return expected


def save_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, subsampling=0)


def write_tiny_imagenet(parent: Path, rng: np.random.Generator) -> dict:
    root = parent / "tiny-imagenet-200"
    wnids = ["n09999999", "n01443537", "n02124075"]  # not sorted on disk; classes come out sorted
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    order = sorted(wnids)
    train = ([], [])
    for wnid in order:
        for i in range(2):
            px = smooth_images(rng, 1, 64, 64)[0]
            save_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", px)
            train[0].append(px)
            train[1].append(order.index(wnid))
    # A JPEG cut short in its entropy-coded data: the kept-bytes path must still catch it.
    whole = (root / "train" / order[0] / "images" / f"{order[0]}_0.JPEG").read_bytes()
    (root / "train" / order[0] / "images" / f"{order[0]}_9.JPEG").write_bytes(whole[: len(whole) // 2])
    lines, val = [], ([], [])
    for i, wnid in enumerate(["n02124075", "n09999999", "n01443537", "n02124075"]):
        px = smooth_images(rng, 1, 64, 64)[0]
        save_jpeg(root / "val" / "images" / f"val_{i}.JPEG", px)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
        val[0].append(px)
        val[1].append(order.index(wnid))
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {"train": train, "val": val}


def write_imagefolder(root: Path, rng: np.random.Generator) -> dict:
    """12 classes (labels up to 11), RGB PNGs of two sizes plus every awkward mode and one corrupt file."""
    classes = [f"c{i:02d}" for i in range(12)]
    expected = {"train": ([], []), "val": ([], [])}
    for label, cls in enumerate(classes):
        for split, n in (("train", 1), ("val", 1)):
            for i in range(n):
                px = smooth_images(rng, 1, 20 + 4 * (label % 2), 24)[0]
                path = root / split / cls / f"img{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(px).save(path)
                expected[split][0].append(px)
                expected[split][1].append(label)
    odd = root / "train" / "c11"
    h, w = 8, 8
    specials = []
    Image.fromarray(np.full((h, w), 100, np.uint8), "L").save(odd / "z1_gray.png")
    specials.append(np.full((h, w, 3), 100, np.uint8))
    pal = Image.new("P", (w, h), 0)
    pal.putpalette([200, 30, 40] + [0] * 765)
    pal.save(odd / "z2_palette.png")
    specials.append(np.broadcast_to(np.array([200, 30, 40], np.uint8), (h, w, 3)))
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[:, : w // 2] = [10, 20, 30, 255]  # opaque left half, fully transparent right half
    Image.fromarray(rgba, "RGBA").save(odd / "z3_rgba.png")
    want = np.full((h, w, 3), 255, np.uint8)
    want[:, : w // 2] = [10, 20, 30]
    specials.append(want)
    Image.new("CMYK", (w, h), (0, 255, 255, 0)).save(odd / "z4_cmyk.tif")
    specials.append(np.broadcast_to(np.array([255, 0, 0], np.uint8), (h, w, 3)))
    Image.fromarray(np.full((h, w), 40000, np.uint16)).save(odd / "z5_gray16.png")
    specials.append(np.full((h, w, 3), 40000 >> 8, np.uint8))
    (odd / "z6_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    # The class-c11 train images come after img0.png in sorted order; the corrupt one is skipped.
    expected["train"][0].extend(specials)
    expected["train"][1].extend([11] * len(specials))
    (root / "train" / "c03" / "notes.txt").write_text("not an image: ignored")
    return expected


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    rng = np.random.default_rng(7)
    base = tmp_path_factory.mktemp("src")
    return {
        "cifar10": (base / "c10", write_cifar10(base / "c10", rng)),
        "cifar100": (base / "c100", write_cifar100(base / "c100", rng)),
        "stl10": (base / "stl" / "stl10_binary", write_stl10(base / "stl", rng)),
        "tiny-imagenet": (base / "tin", write_tiny_imagenet(base / "tin", rng)),
        "imagefolder": (base / "folder", write_imagefolder(base / "folder", rng)),
    }


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """Each fake source converted once, in-process; PNG where pixels must survive exactly."""
    out = tmp_path_factory.mktemp("out")
    formats = {
        "cifar10": "png",
        "cifar100": "jpg",
        "stl10": "png",
        "tiny-imagenet": "jpg",
        "imagefolder": "png",
    }
    dirs = {}
    for name, (src, _) in sources.items():
        dirs[name] = out / name
        assert (
            run(
                "--dataset",
                name,
                "--src",
                src,
                "--out",
                dirs[name],
                "--format",
                formats[name],
                "--shard-size",
                "4",
            )
            == 0
        )
    return dirs


# --------------------------------------------------------------------------- readers


def read_webdataset(root: Path, split: str) -> tuple[list[str], list[np.ndarray], list[int | None]]:
    tars, _ = shard_paths(root, split)
    keys, images, labels = [], [], []
    for sample in wds.WebDataset(tars, shardshuffle=False).decode("rgb8"):
        keys.append(sample["__key__"])
        images.append(sample["png"] if "png" in sample else sample["jpg"])
        labels.append(sample.get("cls"))
    return keys, images, labels


def read_dali(root: Path, split: str) -> tuple[list[np.ndarray], list[int | None]]:
    from nvidia.dali import fn, pipeline_def, types

    m = read_manifest(root)
    info = m.split(split)
    tars, idxs = shard_paths(root, split)
    ext = m.extra["encoding"]["format"]

    @pipeline_def(batch_size=info.num_samples, num_threads=1, device_id=None)
    def pipe():
        outs = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=[ext, "cls"] if info.labeled else [ext],
            missing_component_behavior="error",
            name="r",
        )
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return (fn.decoders.image(outs[0], device="cpu", output_type=types.RGB), *outs[1:])

    p = pipe()
    p.build()
    out = p.run()
    images = [np.array(out[0].at(i)) for i in range(info.num_samples)]
    labels = [int(bytes(np.array(out[1].at(i))).decode()) if info.labeled else None for i in range(info.num_samples)]
    return images, labels


def assert_pixels(got: list[np.ndarray], want: list[np.ndarray], exact: bool) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.uint8
        diff = np.abs(g.astype(int) - w.astype(int))
        if exact:
            assert diff.max() == 0
        else:
            assert diff.mean() < 2.5 and diff.max() < 40  # JPEG at quality 95, 4:4:4


def check_split(root: Path, split: str, want: tuple, exact: bool, dali: bool = True) -> None:
    images, labels = want
    info = read_manifest(root).split(split)
    assert info.num_samples == len(images)
    keys, got, got_labels = read_webdataset(root, split)
    assert len(set(keys)) == len(keys)
    # Shards hold the split in a seeded random order; keys end with the source index, so sorting by
    # key gives the source order back (both readers go through the tars in the same order).
    by_source = np.argsort([int(k.rsplit("_", 1)[1]) for k in keys], kind="stable")
    want_labels = labels if labels is not None else [None] * len(images)
    assert [got_labels[i] for i in by_source] == want_labels
    assert_pixels([got[i] for i in by_source], images, exact)
    if dali:
        got, got_labels = read_dali(root, split)
        assert [got_labels[i] for i in by_source] == want_labels
        assert_pixels([got[i] for i in by_source], images, exact)


# --------------------------------------------------------------------------- per dataset


def test_cifar10_png_is_exact(sources, converted):
    want = sources["cifar10"][1]
    m = read_manifest(converted["cifar10"])
    assert m.classes[1] == "automobile" and m.image_size == [32, 32]
    assert m.splits["train"].shard_sizes == [4, 4, 4, 3]
    for split in ("train", "test"):
        check_split(converted["cifar10"], split, want[split], exact=True)


def test_samples_are_written_in_the_seeded_global_order(converted):
    m = read_manifest(converted["cifar10"])
    assert m.shuffle_seed == 0
    for split in ("train", "test"):
        keys, _, _ = read_webdataset(converted["cifar10"], split)
        written = [int(k.rsplit("_", 1)[1]) for k in keys]
        assert written == convert.split_order(split, len(keys), 0).tolist()
        assert written != sorted(written)


def test_cifar100_fine_labels_jpeg(sources, converted):
    want = sources["cifar100"][1]
    m = read_manifest(converted["cifar100"])
    assert m.num_classes == 100 and m.extra["coarse_classes"][19] == "coarse19"
    for split in ("train", "test"):
        check_split(converted["cifar100"], split, want[split], exact=False)
    assert 99 in want["train"][1]


def test_stl10_column_major_and_unlabeled(sources, converted):
    want = sources["stl10"][1]
    m = read_manifest(converted["stl10"])
    assert m.classes == [f"stl{i}" for i in range(10)] and m.image_size == [96, 96]
    assert not m.splits["unlabeled"].labeled
    for split in ("train", "test", "unlabeled"):
        check_split(converted["stl10"], split, want[split], exact=True)
    assert want["train"][1][0] == 9  # label 10 on disk


def test_tiny_imagenet_train_and_val(sources, converted):
    want = sources["tiny-imagenet"][1]
    m = read_manifest(converted["tiny-imagenet"])
    assert m.classes == ["n01443537", "n02124075", "n09999999"] and m.image_size == [64, 64]
    assert m.extra["class_descriptions"][0] == "thing n01443537"
    skipped = m.splits["train"].skipped
    assert [s["source"] for s in skipped] == ["train/n01443537/images/n01443537_9.JPEG"]
    assert "truncated" in skipped[0]["reason"]
    for split in ("train", "val"):
        check_split(converted["tiny-imagenet"], split, want[split], exact=False)


def test_imagefolder_modes_and_corrupt_file(sources, converted):
    root = converted["imagefolder"]
    want = sources["imagefolder"][1]
    m = read_manifest(root)
    assert m.classes == [f"c{i:02d}" for i in range(12)]
    assert m.image_size is None  # 20x24, 24x24 and 8x8 images
    skipped = m.splits["train"].skipped
    assert [s["source"] for s in skipped] == ["train/c11/z6_corrupt.jpg"] and skipped[0]["reason"]
    check_split(root, "train", want["train"], exact=True)
    check_split(root, "val", want["val"], exact=True, dali=False)
    report = verify_dataset(root)
    assert report.ok and any("skipped" in w for w in report.warnings)


def test_imagefolder_strict_fails_on_corrupt_file(sources, tmp_path, capsys):
    assert (
        run(
            "--dataset",
            "imagefolder",
            "--src",
            sources["imagefolder"][0],
            "--out",
            tmp_path / "o",
            "--strict",
            "--format",
            "png",
        )
        != 0
    )
    assert "z6_corrupt.jpg" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_imagefolder_resize_shorter_side(sources, tmp_path):
    out = tmp_path / "o"
    assert run("--dataset", "imagefolder", "--src", sources["imagefolder"][0], "--out", out, "--resize", "12") == 0
    _, images, _ = read_webdataset(out, "val")
    assert sorted({im.shape[:2] for im in images}) == [(12, 12), (12, 14)]  # 24x24 and 20x24 sources


def test_tiny_imagenet_keeps_jpeg_bytes(sources, converted):
    src = sources["tiny-imagenet"][0] / "tiny-imagenet-200"
    tars, _ = shard_paths(converted["tiny-imagenet"], "val")
    first = next(iter(wds.WebDataset(tars, shardshuffle=False)))
    assert first["jpg"] == (src / "val" / "images" / "val_0.JPEG").read_bytes()


# --------------------------------------------------------------------------- digits


def test_digits_stratified_and_deterministic(tmp_path):
    images, labels = digits_arrays()
    train, test = stratified_split(labels)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels)
    for c in range(10):
        assert (labels[test] == c).sum() == round(0.2 * (labels == c).sum())
    again = stratified_split(labels)
    assert np.array_equal(again[1], test)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("--dataset", "digits", "--out", a, "--format", "png") == 0
    assert run("--dataset", "digits", "--out", b, "--format", "png") == 0
    for name in ("train-000000.tar", "test-000000.tar"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    m = read_manifest(a)
    assert m.splits["test"].num_samples == len(test) and m.image_size == [32, 32]
    _, got, got_labels = read_webdataset(a, "test")
    order = test[convert.split_order("test", len(test), 0)]  # the seeded global order
    assert got_labels == labels[order].tolist()
    assert_pixels(got, list(images[order]), exact=True)


def test_rerun_on_finished_folder_says_complete(converted, sources, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in converted["cifar10"].iterdir()}
    assert (
        run(
            "--dataset",
            "cifar10",
            "--src",
            sources["cifar10"][0],
            "--out",
            converted["cifar10"],
            "--format",
            "png",
            "--shard-size",
            "4",
        )
        == 0
    )
    assert "already complete" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in converted["cifar10"].iterdir()}


# --------------------------------------------------------------------------- verification


def test_verify_ok_and_truncated_tar(converted, tmp_path, capsys):
    import shutil

    root = tmp_path / "c10"
    shutil.copytree(converted["cifar10"], root)
    assert run("--verify", root) == 0
    assert "OK" in capsys.readouterr().out
    tar = root / "train-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    assert run("--verify", root) != 0
    err = capsys.readouterr().err
    assert "train-000001.tar" in err and "truncated" in err


def test_verify_catches_bad_index_and_counts(converted, tmp_path):
    import shutil

    root = tmp_path / "c10"
    shutil.copytree(converted["cifar10"], root)
    idx = root / "train-000000.idx"
    lines = idx.read_text().splitlines()
    tok = lines[2].split()
    tok[1] = str(int(tok[1]) + 512)
    lines[2] = " ".join(tok)
    idx.write_text("\n".join(lines) + "\n")
    raw = json.loads((root / "manifest.json").read_text())
    raw["splits"]["test"]["num_samples"] += 1
    (root / "manifest.json").write_text(json.dumps(raw))
    report = verify_dataset(root)
    assert not report.ok
    assert any("train-000000.idx" in p and "offset" in p for p in report.problems)
    assert any("split 'test'" in p for p in report.problems)


# --------------------------------------------------------------------------- resume


def test_interrupted_conversion_resumes_to_the_same_result(sources, converted, tmp_path, monkeypatch):
    src = sources["cifar10"][0]
    out = tmp_path / "resumed"
    real = convert.convert_shard
    calls = []

    def dying(task):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the third shard
        calls.append(task)
        return real(task)

    monkeypatch.setattr(convert, "convert_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        run("--dataset", "cifar10", "--src", src, "--out", out, "--format", "png", "--shard-size", "4")
    monkeypatch.setattr(convert, "convert_shard", real)
    assert not (out / "manifest.json").exists()
    assert len(list(out.glob("*.tar"))) == 2
    # Leftovers of a write that was cut off, and a progress line cut short.
    (out / "train-000002.tar.tmp").write_bytes(b"partial")
    with open(out / convert.PROGRESS, "a") as f:
        f.write('{"split": "train", "sha')
    assert run("--dataset", "cifar10", "--src", src, "--out", out, "--format", "png", "--shard-size", "4") == 0
    assert not list(out.glob("*.tmp"))
    clean = converted["cifar10"]
    for tar in sorted(clean.glob("*.tar")):
        assert (out / tar.name).read_bytes() == tar.read_bytes()
    resumed, fresh = (json.loads((d / "manifest.json").read_text()) for d in (out, clean))
    for m in (resumed, fresh):  # the verdicts differ only in when they were made and the tars' mtimes
        for info in m["splits"].values():
            check = info.pop("check")
            assert check["result"] == "ok" and check["by"] == "conversion" and len(check["tars"]) == len(info["shards"])
    assert resumed == fresh
    assert verify_dataset(out).ok


def test_shard_with_wrong_count_is_redone(sources, converted, tmp_path):
    import shutil

    out = tmp_path / "c10"
    shutil.copytree(converted["cifar10"], out)
    (out / "manifest.json").unlink()
    (out / "train-000001.idx").write_text("v1.2 1\njpg 512 3 x.jpg\n")  # does not match its record
    assert (
        run(
            "--dataset",
            "cifar10",
            "--src",
            sources["cifar10"][0],
            "--out",
            out,
            "--format",
            "png",
            "--shard-size",
            "4",
        )
        == 0
    )
    assert verify_dataset(out).ok


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "dataset, remove, expected",
    [
        ("cifar10", "cifar-10-batches-py/data_batch_3", "data_batch_3"),
        ("cifar100", "cifar-100-python/meta", "meta"),
        ("stl10", "train_y.bin", "train_y.bin"),
        ("tiny-imagenet", "tiny-imagenet-200/val/val_annotations.txt", "val_annotations.txt"),
    ],
)
def test_wrong_layout_names_the_missing_file(sources, tmp_path, capsys, dataset, remove, expected):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(sources[dataset][0], src)
    (src / remove).unlink()
    out = tmp_path / "out"
    assert run("--dataset", dataset, "--src", src, "--out", out) != 0
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_missing_source_and_flat_imagefolder(tmp_path, capsys):
    assert run("--dataset", "cifar10", "--src", tmp_path / "nope", "--out", tmp_path / "o") != 0
    assert "does not exist" in capsys.readouterr().err
    flat = tmp_path / "flat" / "cats"
    flat.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(flat / "a.png")
    assert run("--dataset", "imagefolder", "--src", tmp_path / "flat", "--out", tmp_path / "o") != 0
    err = capsys.readouterr().err
    assert "ROOT/<split>/<class>/<image>" in err and "cats" in err
    assert not (tmp_path / "o").exists()


def test_refuses_other_dataset_unless_overwrite(sources, converted, tmp_path, capsys):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(converted["stl10"], out)
    args = ["--dataset", "cifar10", "--src", sources["cifar10"][0], "--out", out, "--format", "png"]
    assert run(*args) != 0
    assert "'stl10'" in capsys.readouterr().err
    assert run(*args, "--overwrite") == 0
    assert read_manifest(out).dataset == "cifar10" and not list(out.glob("unlabeled-*"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert run("--dataset", "digits", "--out", tmp_path / "other") != 0
    assert "not empty" in capsys.readouterr().err
    assert run("--dataset", "digits", "--out", tmp_path / "other", "--overwrite") == 0
    assert (tmp_path / "other" / "keep.txt").exists() and verify_dataset(tmp_path / "other").ok


# --------------------------------------------------------------------------- the real command line


@pytest.mark.slow  # a child interpreter
def test_cli_subprocess_two_workers(sources, converted, tmp_path):
    out = tmp_path / "c10"
    cmd = [
        sys.executable,
        str(TOOL),
        "--dataset",
        "cifar10",
        "--src",
        str(sources["cifar10"][0]),
        "--out",
        str(out),
        "--format",
        "png",
        "--shard-size",
        "4",
        "--workers",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cifar10: train 15, test 3 (10 classes, 32x32, png, 0 skipped)" in done.stdout
    for tar in sorted(converted["cifar10"].glob("*.tar")):
        assert (out / tar.name).read_bytes() == tar.read_bytes()
    check = subprocess.run([sys.executable, str(TOOL), "--verify", str(out)], capture_output=True, text=True)
    assert check.returncode == 0 and "OK" in check.stdout
    (out / "test-000000.idx").unlink()
    check = subprocess.run([sys.executable, str(TOOL), "--verify", str(out)], capture_output=True, text=True)
    assert check.returncode != 0 and "test-000000.idx is missing" in check.stderr


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (32, 32), (7, 96)])
def test_encode_png_is_lossless(shape):
    import io

    px = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    data = encode_png(px)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), px)


def test_cifar_pickle_that_would_run_code_is_refused(sources, tmp_path, capsys):
    src = Path(shutil.copytree(sources["cifar10"][0], tmp_path / "src"))
    root = src / "cifar-10-batches-py" if (src / "cifar-10-batches-py").is_dir() else src
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": Payload()}))
    assert run("--dataset", "cifar10", "--src", src, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "batches.meta" in lines[0] and "refers to posix.system" in lines[0], err
