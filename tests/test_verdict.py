"""A dataset's content verdict gates training; foreign tars with odd labels, names and members are
refused naming the place (or indexed); a split past the old 512 MiB cut-off is still checked."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_dataset
from PIL import Image

from ensiam_fast.data.preflight import preflight
from ensiam_fast.data.spec import read_split
from ensiam_fast.shards.cli import main as make_shards
from ensiam_fast.shards.format import (
    ShardFormatError,
    image_dims,
    image_problem,
    label_set_problem,
    parse_label,
    parse_labels,
)
from ensiam_fast.shards.index import read_index
from ensiam_fast.shards.manifest import read_manifest, write_manifest
from ensiam_fast.shards.verdict import VERDICT_FORMAT, make_verdict

REPO = Path(__file__).resolve().parents[1]


def jpeg(value: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def bomb() -> bytes:
    """A real 16x16 JPEG whose frame header claims 30000x30000 pixels (what DALI decoded at 40 s a step)."""
    data = bytearray(jpeg(100))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2
    return bytes(data)


def add(tf: tarfile.TarFile, name: str | bytes, data: bytes = b"", **info) -> None:
    ti = tarfile.TarInfo(name.decode("latin-1") if isinstance(name, bytes) else name)
    ti.size = len(data)
    for k, v in info.items():
        setattr(ti, k, v)
    tf.addfile(ti, io.BytesIO(data) if data else None)


def write_tar(path: Path, members: list[tuple], encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding=encoding) as tf:
        for m in members:
            add(tf, *m[:2], **(m[2] if len(m) > 2 else {}))
    return path


def samples(*labels, start: int = 0) -> list[tuple]:
    out = []
    for i, y in enumerate(labels, start):
        out += [(f"s{i}.jpg", jpeg(10 * i % 250)), (f"s{i}.cls", str(y).encode())]
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def adopt(root: Path, *extra: str) -> int:
    return make_shards(["--dataset", "webdataset", "--src", str(root), "--workers", "1", "--quiet", *extra])


def errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


# --------------------------------------------------------------------------- the rules, unit level


def test_label_rules():
    assert parse_label(b" 522\n") == 522 and parse_label(b"000000007") == 7
    for bad, says in (
        (b"seven", "not an ASCII decimal"),
        (b"12345678901234567890", "more than 9 digits"),
        (b"0" * 64 + b"5", "longer than 64 bytes"),  # what the readers read of a .cls is bounded, never cut short
    ):
        with pytest.raises(ValueError, match=says):
            parse_label(bad)
    raw = np.zeros((2, 20), np.uint8)
    raw[0, :2] = np.frombuffer(b"12", np.uint8)
    raw[1, :] = np.frombuffer(b"12345678901234567890", np.uint8)
    with pytest.raises(ShardFormatError, match="more than 9 digits"):
        parse_labels(raw)  # the DALI loader's per-batch path: the same rule
    assert parse_labels(raw[:1]).tolist() == [12]
    assert label_set_problem({0: 5, 1: 5, 2: 1}, None) is None
    assert "never used (1)" in label_set_problem({0: 5, 2: 1}, None)
    wordnet = label_set_problem({1440764: 1, 1443537: 1}, None)
    assert "WordNet" in wordnet and "--classes FILE" in wordnet and "1440764" in wordnet
    assert "more than --max-classes 10" in label_set_problem({0: 1, 11: 1}, None, max_classes=10)


def test_image_header_is_checked_before_decoding():
    assert image_dims(jpeg(0, 24)) == (24, 24)
    assert image_dims(bomb()) == (30000, 30000)
    assert "30000x30000" in image_problem(bomb()) and "--max-pixels" in image_problem(bomb())
    assert image_problem(jpeg(0)) is None
    truncated = image_problem(jpeg(0, 64)[:300])
    assert truncated.startswith("the image does not decode")
    assert "BytesIO" not in image_problem(b"not an image at all") and "not an image" in image_problem(b"x" * 20)
    gif = io.BytesIO()
    Image.new("RGB", (20, 20)).save(gif, "GIF")
    big = bytearray(gif.getvalue())
    big[6:10] = (65000).to_bytes(2, "little") * 2  # a format image_dims does not read: Pillow's header
    assert "decompression bomb" in image_problem(bytes(big), decode=False)
    assert image_problem(gif.getvalue(), decode=False) is None


# --------------------------------------------------------------------------- the verdict gates the loaders


def test_verdict_gates_every_loader(tmp_path):
    root = make_tiny_dataset(tmp_path / "d", {"train": (32, True)}, checked=False)
    with pytest.warns(UserWarning, match="never content-checked"):
        assert read_split(root, "train").checked is False  # an older manifest: warned, checked by the loader
    m = read_manifest(root)
    info = m.splits["train"]
    info.check = make_verdict(root, info, "verify", ["train-000000.tar: sample 'x': it is bad", "two"], 1 << 26)
    write_manifest(root, m)
    with pytest.raises(ShardFormatError) as e:
        read_split(root, "train")
    assert "failed its last check (verify" in str(e.value) and "sample 'x': it is bad (and 1 more)" in str(e.value)
    assert f"--verify {root} --drop-corrupt" in str(e.value)
    info.check = make_verdict(root, info, "verify", [], 1 << 26)
    write_manifest(root, m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # passed and unchanged: not a word
        assert read_split(root, "train").checked is True
    idx = root / info.shards[0].replace(".tar", ".idx")
    idx.write_text(idx.read_text())  # an index rewritten (it could point elsewhere in the unchanged tar)
    with pytest.warns(UserWarning, match=r"tars changed since the check .*its index train-000000.idx changed"):
        assert read_split(root, "train").checked is False
    info.check = make_verdict(root, info, "verify", [], 1 << 26)
    write_manifest(root, m)
    os.utime(root / info.shards[0], ns=(1, 1))  # a tar changed since
    with pytest.warns(UserWarning, match="tars changed since the check"):
        assert read_split(root, "train").checked is False
    for record, says in (({"result": "ok", "verdict_format": VERDICT_FORMAT + 1, "tars": {}}, "newer ensiam_fast"),
                         ("yes", "not one this version reads")):  # fmt: skip
        raw = json.loads((root / "manifest.json").read_text())
        raw["splits"]["train"]["check"] = record
        (root / "manifest.json").write_text(json.dumps(raw))
        with pytest.warns(UserWarning, match=says):
            assert read_split(root, "train").checked is False
    raw["splits"]["train"]["check"] = {"result": "failed", "verdict_format": 99}  # newer, but failed: refused
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardFormatError, match="failed its last check"):
        read_split(root, "train")


# --------------------------------------------------------------------------- foreign tars


def test_odd_labels_are_refused_naming_values_and_fix(tmp_path, capsys):
    root = tmp_path / "wn"
    write_tar(root / "train-0.tar", samples("01440764", "01443537", "01440764"))
    before = snapshot(root)
    assert adopt(root) == 2
    (line,) = errors(capsys)
    assert "1440764" in line and "WordNet" in line and "--classes FILE" in line
    assert snapshot(root) == before  # nothing written, no stray index
    # the fix the message names: a synset list, rewritten with --out
    (tmp_path / "synsets.txt").write_text("n01440764\nn01443537\n")
    out = tmp_path / "mapped"
    argv = ["--dataset", "webdataset", "--src", str(root), "--out", str(out), "--classes",
            str(tmp_path / "synsets.txt"), "--workers", "1", "--quiet"]  # fmt: skip
    assert make_shards(argv) == 0
    m = read_manifest(out)
    assert m.classes == ["n01440764", "n01443537"] and m.splits["train"].check["result"] == "ok"
    assert make_shards(["--verify", str(out), "--workers", "1", "--quiet"]) == 0
    # a 20-digit label: refused as text, no MemoryError
    long = tmp_path / "long"
    write_tar(long / "train-0.tar", samples(0, "12345678901234567890"))
    assert adopt(long) == 2
    (line,) = errors(capsys)
    assert "train-0.tar: sample 's1'" in line and "more than 9 digits" in line
    gaps = tmp_path / "gaps"
    write_tar(gaps / "train-0.tar", samples(0, 5))
    assert adopt(gaps) == 2 and "not 0..5" in errors(capsys)[0]


def test_repeated_keys_named_in_both_places_or_dropped(tmp_path, capsys):
    across = tmp_path / "across"
    write_tar(across / "a-train.tar", samples(0, 1))
    write_tar(across / "b-train.tar", samples(1, 0, start=1))  # s1 again
    before = snapshot(across)
    assert adopt(across) == 2
    (line,) = errors(capsys)
    assert "'s1'" in line and "a-train.tar" in line and "b-train.tar" in line and "--drop-duplicates" in line
    assert snapshot(across) == before
    within = tmp_path / "within"
    write_tar(within / "x-train.tar", samples(0, 1) + samples(1, start=0))  # s0 comes back after s1
    assert adopt(within) == 2
    (line,) = errors(capsys)
    assert "'s0' comes twice in one tar" in line and "byte 0, again at byte" in line
    for root, n in ((across, 3), (within, 2)):
        assert adopt(root, "--drop-duplicates") == 0
        info = read_manifest(root).splits["train"]
        assert info.num_samples == n and len(info.skipped) == 1 and "duplicate" in info.skipped[0]["reason"]
        assert make_shards(["--verify", str(root), "--workers", "1", "--quiet"]) == 0  # the drop is not a problem


def test_odd_members_and_names(tmp_path, capsys):
    latin = tmp_path / "latin"
    write_tar(latin / "x-train.tar", [(b"caf\xe9.jpg", jpeg(9)), (b"caf\xe9.cls", b"0"), *samples(1, start=1)],
              encoding="latin-1")  # fmt: skip
    assert adopt(latin) == 0, capsys.readouterr().err
    (idx,) = latin.glob("*.idx")
    assert b"caf\xe9.jpg" in idx.read_bytes()  # indexed as the bytes it is
    assert read_index(idx)[0][0].member == "caf\udce9.jpg"
    from ensiam_fast.data import build_loader

    loader = build_loader(latin, "train", batch_size=2, views=1, preset="eval", train=False, num_threads=1)
    (x, y), *_ = list(loader)
    assert sorted(y.tolist()) == [0, 1] and x.shape[1] == 2
    hard = tmp_path / "hard"
    write_tar(hard / "x-train.tar", [*samples(0), ("s1.jpg", b"", {"type": tarfile.LNKTYPE, "linkname": "s0.jpg"}),
                                     ("s1.cls", b"1")])  # fmt: skip
    before = snapshot(hard)
    assert adopt(hard) == 2
    (line,) = errors(capsys)
    assert "member 's1.jpg'" in line and "hard link to 's0.jpg'" in line and "x-train.tar" in line
    sym = tmp_path / "sym"
    write_tar(sym / "x-train.tar", [*samples(0), ("s1.jpg", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})])
    assert adopt(sym) == 2 and "symbolic link to '/etc/passwd'" in errors(capsys)[0]
    assert snapshot(hard) == before
    # a tar cut in the middle of a header: named with the byte offset, nothing written
    cut = tmp_path / "cut"
    tar = write_tar(cut / "x-train.tar", samples(0, 1, 0))
    with tarfile.open(tar) as tf:
        header = tf.getmembers()[2].offset  # s1.jpg's header
    tar.write_bytes(tar.read_bytes()[: header + 100])
    before = snapshot(cut)
    assert adopt(cut) == 2
    (line,) = errors(capsys)
    assert "x-train.tar" in line and f"truncated or corrupt at byte {header}" in line
    assert snapshot(cut) == before
    tar.write_bytes(tar.read_bytes()[:header] + b"garbage" * 100 + bytes(2048))  # a header overwritten mid-tar
    assert adopt(cut) == 2 and f"truncated or corrupt at byte {header}" in errors(capsys)[0]
    assert sorted(snapshot(cut)) == ["x-train.tar"]
    # a member named ../x is a name like any other: indexed, nothing read or written outside
    dots = tmp_path / "dots" / "inner"
    write_tar(dots / "x-train.tar", [("../evil.jpg", jpeg(3)), ("../evil.cls", b"0"), *samples(1, start=1)])
    outside = snapshot(tmp_path / "dots")
    assert adopt(dots) == 0
    assert set(snapshot(tmp_path / "dots")) - set(outside) == {"inner/manifest.json", "inner/x-train.idx"}


def test_failed_adoption_is_recorded_and_refused(tmp_path, capsys):
    root = tmp_path / "bad"
    members = samples(0, 1, 0)
    members[2] = ("s1.jpg", jpeg(50, 64)[:400])  # truncated
    write_tar(root / "x-train.tar", members)
    assert adopt(root) == 1
    err = capsys.readouterr()
    assert "FAILED" in err.out and "nothing trains on it" in err.out
    check = read_manifest(root).splits["train"].check
    assert check["result"] == "failed" and check["by"] == "adoption" and "'s1'" in check["first_problem"]
    with pytest.raises(ShardFormatError, match="failed its last check"):
        read_split(root, "train")
    assert make_shards(["--verify", str(root), "--drop-corrupt", "--workers", "1", "--quiet"]) == 0
    assert read_split(root, "train").checked is True  # the fix the message names, recorded


# --------------------------------------------------------------------------- past the old 512 MiB cut-off

BIG = 513 << 20


def big_split(root: Path, bad: bool = True) -> Path:
    """A split of 513 MiB in one tar (a sparse, zero-filled extra member: fast) with a bomb and a
    truncated JPEG among good samples (``bad``)."""
    members = samples(0, 1, 0, 1)
    if bad:
        members[2] = ("s1.jpg", bomb())
        members[4] = ("s2.jpg", jpeg(80, 64)[:400])
    tar = root / "x-train.tar"
    root.mkdir(parents=True)
    with open(tar, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in members[:2]:
                add(tf, name, data)
            pad = tarfile.TarInfo("s0.pad")
            pad.size = BIG
            f.write(pad.tobuf(format=tarfile.USTAR_FORMAT))
            f.seek(BIG, os.SEEK_CUR)  # a hole: no data written
            tf.offset = f.tell()
            for name, data in members[2:]:
                add(tf, name, data)
    assert tar.stat().st_size > BIG and tar.stat().st_blocks * 512 < 16 << 20  # sparse
    return root


def test_big_split_checked_at_any_size(tmp_path, capsys):
    root = big_split(tmp_path / "big")
    assert adopt(root) == 1  # checked all the way: both found, recorded as failed
    err = capsys.readouterr().err
    assert "sample 's1'" in err and "30000x30000" in err and "sample 's2'" in err and "does not decode" in err
    assert make_shards(["--verify", str(root), "--workers", "1", "--quiet"]) == 1
    problems = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("problem:")]
    assert len(problems) == 2 and "30000x30000" in problems[0] and "does not decode" in problems[1]
    with pytest.raises(ShardFormatError, match="failed its last check"):
        read_split(root, "train")
    # without a verdict (an older manifest) the loader checks every header itself: the bomb is one line
    raw = json.loads((root / "manifest.json").read_text())
    del raw["splits"]["train"]["check"]
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="never content-checked"):
        split = read_split(root, "train")
    with pytest.raises(ShardFormatError, match=r"sample 's1'.*30000x30000"):
        preflight(split)


def test_only_tars_changed_since_the_check_are_checked_again(tmp_path, capsys):
    root = big_split(tmp_path / "big", bad=False)
    write_tar(root / "y-train.tar", samples(0, 1, start=10))
    assert adopt(root) == 0, capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_split(root, "train").checked  # 513 MiB, checked once: nothing to do at a start
    tar = root / "y-train.tar"
    data = tar.read_bytes()
    at = data.index(b"\xff\xd8", data.index(b"s11.jpg")) + 150
    tar.write_bytes(data[:at] + b"\xff\xd9" * 40 + data[at + 80 :])  # s11.jpg overwritten with markers
    with pytest.warns(UserWarning, match="1 of its tars changed since the check"):
        split = read_split(root, "train")
    assert split.trusted == {str(root / "x-train.tar")}
    with pytest.raises(ShardFormatError, match=r"y-train.tar, sample 's11': the image does not decode"):
        preflight(split)  # the changed tar is decoded in full, though the split is past 512 MiB


# --------------------------------------------------------------------------- through the real commands


def run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["failed_adoption", "big_split"])
def test_training_refuses_a_split_that_failed_its_check(tmp_path, case):
    if case == "big_split":
        root = big_split(tmp_path / "data")
    else:
        root = tmp_path / "data"
        members = samples(*([0, 1] * 16))
        members[6] = ("s3.jpg", jpeg(50, 64)[:400])
        write_tar(root / "x-train.tar", members)
    proc = run("tools/make_shards.py", "--dataset", "webdataset", "--src", str(root), "--workers", "1", "--quiet")
    assert proc.returncode == 1 and "FAILED" in proc.stdout, proc.stderr[-2000:]
    proc = run("-m", "ensiam_fast.train", "--config", "demo", f"output_dir={tmp_path / 'run'}", f"data.root={root}",
               "data.split=train", "knn_every=0", "max_steps=1", "batch_size=2", "data.image_size=16")  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "failed its last check (adoption" in lines[0] and f"--verify {root} --drop-corrupt" in lines[0]
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.pt"))


def test_messages_name_the_file(tmp_path, capsys):
    src = tmp_path / "folder"
    for split in ("train", "val"):
        (src / split / "cat").mkdir(parents=True)
        (src / split / "cat" / "a.jpg").write_bytes(jpeg(5))
    (src / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "train" / "cat" / "huge.jpg").write_bytes(bomb())
    (src / "train" / "dog").mkdir()  # no images
    argv = ["--dataset", "imagefolder", "--src", str(src), "--workers", "1", "--quiet"]
    assert make_shards([*argv, "--out", str(tmp_path / "o1")]) == 0
    err = capsys.readouterr().err
    assert "skipped train/cat/broken.jpg: not an image Pillow can read" in err and "BytesIO" not in err
    assert "skipped train/cat/huge.jpg: ValueError: the image header says 30000x30000" in err  # before decoding
    m = read_manifest(tmp_path / "o1")
    assert m.splits["train"].num_samples == 1 and {s.check["by"] for s in m.splits.values()} == {"conversion"}
    assert "warning: 1 class folder(s) of" in err and "(dog" in err
    assert make_shards([*argv, "--out", str(tmp_path / "o2"), "--strict"]) == 2
    assert "hold no images (dog" in errors(capsys)[0]
    shutil.rmtree(src / "val")
    (src / "val").mkdir()
    (src / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg(5))
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,cat 1 2 3 4\n")
    assert make_shards([*argv, "--out", str(tmp_path / "o3")]) == 2
    (line,) = errors(capsys)
    assert "LOC_val_solution.csv labels them" in line and f"cd {src / 'val'} && tail -n +2" in line
    script = line.split("arrange them into class folders with: ", 1)[1]
    subprocess.run(["bash", "-c", script], check=True)  # the command given arranges val/ as needed
    assert (src / "val" / "cat" / "ILSVRC2012_val_00000001.JPEG").is_file()
    assert make_shards([*argv, "--out", str(tmp_path / "o4")]) == 0
