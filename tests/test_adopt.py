"""Foreign WebDataset shards (written here by ``webdataset.ShardWriter``) adopted in place or rewritten
with ``--out``, read by both loaders, trained on and evaluated through the real entry points."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ensiam_fast.data import build_loader
from ensiam_fast.shards.cli import main as make_shards
from ensiam_fast.shards.format import IMAGE_EXTS
from ensiam_fast.shards.manifest import read_manifest
from ensiam_fast.shards.sources import digits_arrays

REPO = Path(__file__).resolve().parents[1]
KINDS = ("jpeg", "png", "webp", "jpg")  # the image member of sample i is KINDS[i % 4]


def encode(pixels: np.ndarray, kind: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format={"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[kind])
    return buf.getvalue()


def write_foreign(folder: Path, name: str, images: np.ndarray, labels: np.ndarray | None, maxcount: int) -> None:
    """What a webdataset user writes: ShardWriter, keys of their own, ``cls`` as an int (some samples
    as a ``.cls`` field, which ShardWriter stores as ``KEY..cls``), an extra json member."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{name}-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i, px in enumerate(images):
            kind = KINDS[i % len(KINDS)]
            sample = {"__key__": f"{name}{i:05d}", kind: encode(px, kind), "json": {"i": i}}
            if labels is not None:
                sample[".cls" if i % 7 == 3 else "cls"] = int(labels[i])
            sink.write(sample)


@pytest.fixture(scope="module")
def digits16():
    images, labels = digits_arrays(side=16)
    return images[:600], labels[:600]


@pytest.fixture(scope="module")
def foreign_src(tmp_path_factory, digits16) -> Path:
    """A class-sorted train split (as most foreign datasets are) in 4 tars, and a val split."""
    images, labels = digits16
    root = tmp_path_factory.mktemp("foreign") / "mydigits"
    order = np.argsort(labels[:480], kind="stable")  # class by class
    write_foreign(root, "digits-train", images[order], labels[order], maxcount=120)
    write_foreign(root, "digits-val", images[480:], labels[480:], maxcount=200)
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def adopted_copy(foreign_src: Path, tmp_path: Path) -> Path:
    import shutil

    root = Path(shutil.copytree(foreign_src, tmp_path / foreign_src.name))
    assert make_shards(["--dataset", "webdataset", "--src", str(root), "--workers", "1"]) == 0
    return root


def test_dali_reader_lists_the_image_members_the_format_allows():
    from pipelines.dali import IMAGE_EXTS as DALI_EXTS

    assert DALI_EXTS.split(";") == list(IMAGE_EXTS)


def test_adoption_writes_only_the_manifest_and_indices_and_warns_on_class_sorted_shards(
    foreign_src, digits16, tmp_path, capsys
):
    import shutil

    root = Path(shutil.copytree(foreign_src, tmp_path / "mydigits"))
    before = snapshot(root)
    assert make_shards(["--dataset", "webdataset", "--src", str(root), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    after = snapshot(root)
    new = sorted(set(after) - set(before))
    assert new == sorted(["manifest.json"] + [n[: -len(".tar")] + ".idx" for n in before]), new
    assert all(after[n] == before[n] for n in before)  # every tar untouched: nothing copied or rewritten
    m = read_manifest(root)
    assert m.dataset == "mydigits" and m.classes == [str(i) for i in range(10)] and m.shuffle_seed is None
    assert (m.splits["train"].num_samples, m.splits["val"].num_samples) == (480, 120)
    assert m.splits["train"].shards == [f"digits-train-{i:06d}.tar" for i in range(4)]
    assert m.splits["train"].labeled and m.image_size == [16, 16]
    assert "split 'train' looks class-sorted" in err and "--out NEW" in err
    assert {s.check["result"] for s in m.splits.values()} == {"ok"}  # the verdict is recorded, by adoption
    assert {s.check["by"] for s in m.splits.values()} == {"adoption"}
    # adopting again (say after adding tars) is allowed and gives the same manifest (its check made anew)
    assert make_shards(["--dataset", "webdataset", "--src", str(root), "--workers", "2"]) == 0
    again = read_manifest(root)
    for a, b in zip(again.splits.values(), m.splits.values()):
        assert a.check.pop("at") and b.check.pop("at")
        # the indices are written anew, so their mtimes (recorded with the verdict) move; their sizes do not
        ia, ib = a.check.pop("indices"), b.check.pop("indices")
        assert {n: v[0] for n, v in ia.items()} == {n: v[0] for n, v in ib.items()} and len(ia) == len(a.shards)
    assert again == m


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_both_loaders_read_jpeg_png_webp_and_both_label_spellings(foreign_src, digits16, tmp_path, backend):
    root = adopted_copy(foreign_src, tmp_path)
    images, labels = digits16
    loader = build_loader(root, "val", batch_size=64, views=1, preset="eval", train=False, backend=backend,
                          image_size=16, num_threads=1)  # fmt: skip
    xs, ys = zip(*loader)
    y = torch.cat(ys)
    assert y.tolist() == labels[480:].tolist()  # evaluation order is the tars' order: every sample, once
    x = torch.cat(xs, dim=1)[0].float()  # (N, 3, 16, 16)
    truth = torch.from_numpy(images[480:]).permute(0, 3, 1, 2).float()
    err = (x - truth).abs().mean(dim=(1, 2, 3))
    # png (i % 4 == 1) is lossless; every kind decodes to the right picture (JPEG/WebP: lossy)
    assert err[1::4].max() < 1.0, err[1::4].max()
    assert err.max() < 12.0, (err.max(), err.argmax())


def test_split_globs_and_class_names(foreign_src, tmp_path, capsys):
    import shutil

    root = Path(shutil.copytree(foreign_src, tmp_path / "d"))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    argv = ["--dataset", "webdataset", "--src", str(root), "--workers", "1", "--classes", str(names),
            "--split", "pretrain=*train-00000[0-2].tar", "--split", "holdout=*train-000003.tar"]  # fmt: skip
    assert make_shards(argv) == 0
    m = read_manifest(root)
    assert sorted(m.splits) == ["holdout", "pretrain"] and m.classes[3] == "digit 3"
    assert (m.splits["pretrain"].num_samples, m.splits["holdout"].num_samples) == (360, 120)
    assert "belong to no split" in capsys.readouterr().err  # the val tar is left out, and said so
    names.write_text("\n".join(f"digit {i}" for i in range(5)) + "\n")  # labels 5..9 have no name
    for bad, says in (
        (["--classes", str(names)], "has the label 9, but --classes"),
        (["--split", "a=*train*", "--split", "b=*-000000.tar"], "matches the --split globs of a and b"),
        (["--split", "a=*nothing*"], "--split a='*nothing*' matches no tar"),
        (["--split", "a+b=*train*"], "expected NAME=GLOB"),
    ):
        assert make_shards(["--dataset", "webdataset", "--src", str(root), "--workers", "1", *bad]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and says in lines[0], (bad, lines)


def test_bad_foreign_datasets_are_refused_naming_the_tar_and_key(tmp_path, digits16, capsys):
    images, labels = digits16

    def refused(root: Path, says: str) -> None:
        before = snapshot(root)
        assert make_shards(["--dataset", "webdataset", "--src", str(root), "--workers", "1"]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and says in lines[0], lines
        assert snapshot(root) == before  # nothing written

    (tmp_path / "a").mkdir()
    with wds.TarWriter(str(tmp_path / "a" / "x-train.tar")) as w:
        w.write({"__key__": "s0", "jpg": encode(images[0], "jpg"), "cls": 1})
        w.write({"__key__": "s1", "jpg": encode(images[1], "jpg")})  # no label in a labelled split
    refused(tmp_path / "a", "sample 's1' has no .cls")
    (tmp_path / "b").mkdir()
    with wds.TarWriter(str(tmp_path / "b" / "x-train.tar")) as w:
        w.write({"__key__": "s0", "txt": "no image here", "cls": 1})
    refused(tmp_path / "b", "sample 's0' has the members ['cls', 'txt']")
    (tmp_path / "c").mkdir()
    with wds.TarWriter(str(tmp_path / "c" / "x-train.tar")) as w:
        w.write({"__key__": "s0", "jpg": encode(images[0], "jpg"), "cls": "seven"})
    refused(tmp_path / "c", "sample 's0': the label 'seven' is not an ASCII decimal")
    (tmp_path / "d").mkdir()
    with wds.TarWriter(str(tmp_path / "d" / "shards.tar")) as w:
        w.write({"__key__": "s0", "jpg": encode(images[0], "jpg"), "cls": 1})
    refused(tmp_path / "d", "--split NAME=GLOB")  # no split named: say how to name it
    # a converted dataset is not re-adopted over; a tar linking outside the folder is refused
    out = tmp_path / "conv"
    assert make_shards(["--dataset", "digits", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    refused(out, "was not written by an adoption")
    (tmp_path / "e").mkdir()
    os.symlink(tmp_path / "d" / "shards.tar", tmp_path / "e" / "link-train.tar")
    refused(tmp_path / "e", "leads outside")


def test_out_rewrites_class_sorted_shards_into_mixed_ones(foreign_src, tmp_path, capsys):
    before = snapshot(foreign_src)
    out = tmp_path / "mixed"
    argv = ["--dataset", "webdataset", "--src", str(foreign_src), "--out", str(out), "--workers", "2",
            "--shard-size", "120", "--quiet"]  # fmt: skip
    assert make_shards(argv) == 0
    assert snapshot(foreign_src) == before
    m = read_manifest(out)
    assert (m.splits["train"].num_samples, m.splits["val"].num_samples) == (480, 120)
    assert m.dataset == "mydigits" and m.shuffle_seed == 0 and m.num_classes == 10
    capsys.readouterr()
    assert make_shards(["--verify", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr()
    assert "class-sorted" not in printed.err
    observed = float(printed.out.split("split train: ")[1].split(" classes")[0])
    assert observed > 9.0  # every shard of 120 holds (nearly) all 10 classes; the foreign ones held 2-3


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.mark.slow
def test_adopt_train_and_evaluate_through_the_real_commands(foreign_src, tmp_path):
    import shutil

    root = Path(shutil.copytree(foreign_src, tmp_path / "mydigits"))
    proc = run(["tools/make_shards.py", "--dataset", "webdataset", "--src", str(root), "--workers", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "run"
    # views at the images' own 16x16 (the demo's 32 cost four times the FLOPs for the same checks), with
    # the eval preset: what is checked is the adopted split's path through training and evaluation, not
    # the augmentation, and the default preset's Numba operators are compiled again in each child
    proc = run(["-m", "ensiam_fast.train", "--config", "demo", f"output_dir={out}", f"data.root={root}",
                "data.preset=eval", "data.knn_test_split=val", "max_steps=2", "knn_every=1", "knn_k=5", "batch_size=32",
                "eval_batch_size=64", "log_every=1", "data.num_threads=2", "model.proj_hidden=32",
                "model.proj_dim=32", "model.pred_hidden=8",
                "data.image_size=16"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    monitor = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["knn_samples"] for r in monitor if "knn_samples" in r] == [120, 120]  # at step 0 and at the end
    proc = run(["-m", "ensiam_fast.evaluate", "knn", "--run", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["samples"] == 120 and record["test_split"] == "val" and record["data"] == str(root)
    assert record["top1"] == pytest.approx(monitor[-1]["knn_top1"], abs=1e-9)  # the monitor's protocol
