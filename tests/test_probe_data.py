"""Cases a hostile test of data ingestion found (probe23): each through the real command where it
broke there, and at function level."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_dataset
from PIL import Image

from ensiam_fast import train
from ensiam_fast.data.preflight import order_problem
from ensiam_fast.data.torch import build_reference_loader
from ensiam_fast.shards.cli import main as make_shards
from ensiam_fast.shards.format import ShardFormatError, image_problem, parse_label
from ensiam_fast.shards.index import read_index, scan_tar
from ensiam_fast.shards.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "batch_size=8", "epochs=1", "log_every=1", "checkpoint_every=1000", "knn_every=1", "knn_k=5",
    "eval_batch_size=16", "data.image_size=16", "data.num_threads=1", "model.proj_hidden=32",
    "model.proj_dim=32", "model.pred_hidden=8", "model.channels_last=false", "model.cifar_stem=true",
    "optim.warmup_epochs=1", "mixed_precision=no", "max_steps=2",
]  # fmt: skip


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_tiny(root: Path, tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = train.main(["--config", "demo", f"output_dir={tmp_path / 'run'}", f"data.root={root}", *TINY, *extra])
    return rc, capsys.readouterr().err


def edit_index_line(idx: Path, line: int, from_line: int) -> None:
    """Give the image of sample ``line`` (1-based, past the version line) the offset and size of
    sample ``from_line``'s image: two index entries then name the same bytes of the tar."""
    lines = idx.read_text().split("\n")
    a, b = lines[line].split(), lines[from_line].split()
    a[1], a[2] = b[1], b[2]
    lines[line] = " ".join(a)
    idx.write_text("\n".join(lines))


def overwrite_jpeg_keeping_stats(tar: Path) -> None:
    """Overwrite the middle of every JPEG of the tar with other bytes, size and mtime kept: the
    recorded verdict still matches the tar, so the loader trusts it and decodes the bad images."""
    st = tar.stat()
    data = bytearray(tar.read_bytes())
    at = data.find(b"\xff\xd8")
    while at >= 0:
        data[at + 400 : at + 600] = b"\x20" * 200
        at = data.find(b"\xff\xd8", at + 600)
    tar.write_bytes(bytes(data))
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))


def animated_webp() -> bytes:
    rgb = Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype("uint8"))
    out = io.BytesIO()
    rgb.save(out, "WEBP", save_all=True, append_images=[rgb.rotate(90)], duration=100)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def jpeg(seed: int = 0) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((16, 16, 3)) * 255).astype("uint8")).save(out, "JPEG")
    return out.getvalue()


# --- an index edited to point one sample at another member's bytes --------------------------------


def test_order_problem_names_overlapping_entries(tmp_path):
    root = make_tiny_dataset(tmp_path / "ds")
    idx = root / "train-000000.idx"
    assert order_problem(read_index(idx)) is None
    edit_index_line(idx, 1, 3)
    problem = order_problem(read_index(idx))
    assert problem is not None and "a header must come between" in problem and "train_000" in problem


def test_order_problem_accepts_pax_and_gnu_long_names(tmp_path):
    """Extra headers (pax records, GNU long names) only push data further: still a valid order."""
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        tar = tmp_path / f"train-{fmt}.tar"
        long = "d" * 150 + "/"
        write_tar(tar, [(f"{long}a.jpg", jpeg(1)), (f"{long}a.cls", b"1"), ("b.jpg", jpeg(2)), ("b.cls", b"0")], fmt)
        assert order_problem(scan_tar(tar)) is None


def test_index_pointing_at_another_member_is_refused_by_the_trainer(tmp_path, capsys):
    root = make_tiny_dataset(tmp_path / "ds")
    edit_index_line(root / "train-000000.idx", 1, 3)
    rc, err = run_tiny(root, tmp_path, capsys)
    line = one_error_line(err)
    assert rc == 2 and f"the index {root / 'train-000000.idx'} does not match its tar" in line
    assert "re-make the dataset" in line
    assert not (tmp_path / "run").exists()


def test_index_past_the_end_of_a_whole_tar_blames_the_index(tmp_path, capsys):
    root = make_tiny_dataset(tmp_path / "ds")
    idx = root / "train-000000.idx"
    lines = idx.read_text().split("\n")
    last = len([ln for ln in lines if ln.strip()]) - 1
    parts = lines[last].split()
    parts[1] = str(10**9)  # the last sample's image far past the end: the order stays valid
    lines[last] = " ".join(parts)
    idx.write_text("\n".join(lines))
    rc, err = run_tiny(root, tmp_path, capsys)
    line = one_error_line(err)
    assert rc == 2 and "past the end of its shard" in line and "the index does not match its tar" in line
    assert "--drop-corrupt" not in line  # it repairs bad samples, not indices


# --- a DataLoader worker's error: one line, no traceback --------------------------------------------


def test_torch_loader_worker_error_is_one_line(tmp_path):
    root = make_tiny_dataset(tmp_path / "ds")
    overwrite_jpeg_keeping_stats(root / "train-000000.tar")
    loader = build_reference_loader(root, "train", batch_size=8, views=2, preset="default", num_threads=1)
    with pytest.raises(ShardFormatError) as e:
        for _ in loader:
            pass
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text and "Caught" not in text, text
    assert "train-000000.tar" in text and "cannot decode the image" in text


@pytest.mark.slow
def test_torch_backend_bad_image_through_the_trainer_is_one_line(tmp_path):
    root = make_tiny_dataset(tmp_path / "ds")
    for tar in sorted(root.glob("train-*.tar")):
        overwrite_jpeg_keeping_stats(tar)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "ensiam_fast.train", "--config", "demo", f"output_dir={tmp_path / 'run'}",
            f"data.root={root}", *TINY, "data.backend=torch", "data.num_threads=2", "knn_every=0"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert "train-00000" in line and "cannot decode the image" in line


# --- animated WebP: DALI reads it, torchvision does not ---------------------------------------------


def test_animated_webp_is_an_image_problem():
    problem = image_problem(animated_webp())
    assert problem is not None and "animated WebP (2 frames)" in problem
    still = io.BytesIO()
    Image.new("RGB", (8, 8)).save(still, "WEBP")
    assert image_problem(still.getvalue()) is None


def test_animated_webp_fails_the_adoption(tmp_path, capsys):
    src = tmp_path / "wds"
    write_tar(src / "train-0.tar", [("a.webp", animated_webp()), ("a.cls", b"0"), ("b.jpg", jpeg()), ("b.cls", b"1")])
    assert make_shards(["--dataset", "webdataset", "--src", str(src), "--quiet"]) == 1
    check = read_manifest(src).splits["train"].check
    assert check["result"] == "failed" and "animated WebP" in check["first_problem"]


# --- labels and the fix named for a failed split ----------------------------------------------------


def test_non_ascii_label_is_shown_as_bytes():
    with pytest.raises(ValueError, match=r"b'\\xd9\\xa1'"):
        parse_label("\u0661".encode())
    with pytest.raises(ValueError, match="'-1'"):
        parse_label(b"-1")


def test_failed_split_with_a_truncated_tar_names_a_fix_that_works(tmp_path, capsys):
    root = make_tiny_dataset(tmp_path / "ds")
    tar = root / "test-000000.tar"
    os.truncate(tar, 512 * 5 + 100)
    assert make_shards(["--verify", str(root), "--quiet"]) == 1
    capsys.readouterr()
    rc, err = run_tiny(root, tmp_path, capsys)
    line = one_error_line(err)
    assert rc == 2 and "failed its last check" in line and "truncated or corrupt" in line
    assert "--drop-corrupt" not in line and "re-make the dataset with tools/make_shards.py" in line


# --- a tar made with `tar cf DIR`: one sample's members apart, not a repeated key ---------------------


def scattered_tar(path: Path) -> None:
    """Members in directory order, as `tar cf` without --sort writes: a .cls before its .jpg, apart."""
    write_tar(path, [("d/s0.cls", b"0"), ("d/s1.cls", b"1"), ("d/s0.jpg", jpeg(1)), ("d/s1.jpg", jpeg(2))])


def test_read_tar_tells_members_apart_from_a_repeated_key(tmp_path):
    from ensiam_fast.shards.index import NOT_ADJACENT, read_tar

    scattered_tar(tmp_path / "a.tar")
    (key, where), *_ = read_tar(tmp_path / "a.tar").duplicates
    assert key == "d/s0" and NOT_ADJACENT in where
    write_tar(tmp_path / "b.tar", [("s0.jpg", jpeg(1)), ("s0.cls", b"0"), ("s1.jpg", jpeg(2)), ("s0.jpg", jpeg(3))])
    (key, where), *_ = read_tar(tmp_path / "b.tar").duplicates
    assert key == "s0" and NOT_ADJACENT not in where


@pytest.mark.slow
def test_scattered_members_are_named_by_the_adoption(tmp_path):
    src = tmp_path / "wds"
    scattered_tar(src / "train-0.tar")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--dataset", "webdataset", "--src", str(src)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "not adjacent" in line and "--drop-duplicates" not in line, proc.stderr
    assert sorted(p.name for p in src.iterdir()) == ["train-0.tar"]  # nothing written


# --- --drop-corrupt that would empty a split: refused before any shard is rewritten ------------------


def adopted_with_an_all_bad_split(src: Path) -> Path:
    """Split aaa: one bad image of four; split zzz (read after aaa): its only image bad."""
    bad = jpeg()[:200]
    good = [(f"g{i}.{ext}", jpeg(i) if ext == "jpg" else b"1") for i in range(3) for ext in ("jpg", "cls")]
    write_tar(src / "aaa-0.tar", [("b0.jpg", bad), ("b0.cls", b"0"), *good])
    write_tar(src / "zzz-0.tar", [("t0.jpg", bad), ("t0.cls", b"0")])
    argv = ["--dataset", "webdataset", "--src", str(src), "--split", "aaa=aaa-*", "--split", "zzz=zzz-*", "--quiet"]
    assert make_shards(argv) == 1
    return src


def test_drop_corrupt_emptying_a_split_changes_nothing(tmp_path, capsys):
    src = adopted_with_an_all_bad_split(tmp_path / "wds")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    capsys.readouterr()
    assert make_shards(["--verify", str(src), "--drop-corrupt", "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "split 'zzz'" in line and "would be empty" in line and "nothing was changed" in line
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


@pytest.mark.slow
def test_drop_corrupt_emptying_a_split_through_the_command(tmp_path):
    src = adopted_with_an_all_bad_split(tmp_path / "wds")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--verify", str(src), "--drop-corrupt", "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "would be empty" in one_error_line(proc.stderr), proc.stderr
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


# --- an EXIF-rotated JPEG: both loaders decode it the same way up --------------------------------------


def test_exif_rotated_jpeg_decodes_as_dali_does():
    from ensiam_fast.data.torch import decode_rgb

    img = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = io.BytesIO()
    img.save(out, "JPEG", exif=exif.tobytes())
    torch_img = decode_rgb(out.getvalue(), "x")
    assert tuple(torch_img.shape) == (3, 40, 20)  # displayed upright: 40 rows of 20
    dali = pytest.importorskip("nvidia.dali")
    data = np.frombuffer(out.getvalue(), np.uint8)

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        return dali.fn.decoders.image(dali.fn.external_source(source=lambda: [data], batch=True), device="cpu")

    pipe = decode()
    pipe.build()
    (dali_out,) = pipe.run()
    assert np.asarray(dali_out[0]).shape == (40, 20, 3)


def exif_rotated_folder(root: Path) -> Path:
    """ROOT/{train,test}/{a,b}/*.jpg: 40 wide, 20 high as stored, EXIF orientation 6 (upright: 20 x 40)."""
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                img = Image.new("RGB", (40, 20), (200, 10 * i, 0))
                exif = img.getexif()
                exif[0x0112] = 6
                img.save(root / split / c / f"{i}.jpg", exif=exif.tobytes())
    return root


@pytest.mark.parametrize("extra", [[], ["--resize", "10"], ["--format", "png"]])
def test_exif_rotated_sources_are_stored_upright_whatever_the_path(tmp_path, extra):
    src = exif_rotated_folder(tmp_path / "src")
    out = tmp_path / "out"
    argv = ["--dataset", "imagefolder", "--src", str(src), "--out", str(out), "--workers", "1", "--quiet", *extra]
    assert make_shards(argv) == 0
    h, w = read_manifest(out).image_size
    assert h == 2 * w, (h, w)  # upright: twice as high as wide, kept bytes or re-encoded
    tar = sorted(out.glob("train-*.tar"))[0]
    (first, *_), *_ = read_index(tar.with_suffix(".idx"))
    with open(tar, "rb") as f:
        f.seek(first.offset)
        stored = Image.open(io.BytesIO(f.read(first.size)))
        assert stored.getexif().get(0x0112, 1) == 1 and stored.size == (w, h)  # no tag left to turn it again


# --- a manifest listing one shard twice: every sample of it read twice -----------------------------------


def test_a_shard_listed_twice_is_refused(tmp_path, capsys):
    import json

    from ensiam_fast.shards.manifest import split_files

    root = make_tiny_dataset(tmp_path / "ds")
    data = json.loads((root / "manifest.json").read_text())
    test = data["splits"]["test"]
    test["shards"] *= 2
    test["shard_sizes"] *= 2
    test["num_samples"] *= 2
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardFormatError, match="lists the shard 'test-000000.tar' twice"):
        split_files(root, read_manifest(root).splits["test"])
    rc, err = run_tiny(root, tmp_path, capsys)
    assert rc == 2 and "twice in one split" in one_error_line(err)
    assert make_shards(["--verify", str(root), "--quiet"]) == 1
    out = capsys.readouterr()
    assert "split 'test' lists the shard 'test-000000.tar' twice" in out.out + out.err


def test_a_fifo_shard_is_named_as_not_a_file(tmp_path, capsys):
    root = make_tiny_dataset(tmp_path / "ds")
    tar = root / "test-000000.tar"
    tar.unlink()
    os.mkfifo(tar)
    rc, err = run_tiny(root, tmp_path, capsys)
    assert rc == 2 and f"shard {tar}" in one_error_line(err) and "not a regular file" in one_error_line(err)
