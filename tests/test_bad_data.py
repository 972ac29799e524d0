"""Corrupt, damaged and hostile datasets end in one clear line and exit code 2, never a crash, and
nothing is written outside the dataset folder or through a link."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import make_tiny_dataset

from ensiam_fast import train
from ensiam_fast.data import build_loader
from ensiam_fast.shards.cli import main as make_shards
from ensiam_fast.shards.format import ShardFormatError
from ensiam_fast.shards.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "batch_size=8", "epochs=1", "log_every=1", "checkpoint_every=1000", "knn_every=1", "knn_k=5",
    "eval_batch_size=16", "data.image_size=16", "data.num_threads=1", "model.proj_hidden=32",
    "model.proj_dim=32", "model.pred_hidden=8", "model.channels_last=false", "model.cifar_stem=true",
    "optim.warmup_epochs=1", "mixed_precision=no", "max_steps=2",
]  # fmt: skip


def corrupt_jpeg(tar: Path, nth: int = 1) -> None:
    """Overwrite the entropy-coded middle of the tar's nth JPEG with markers (its index stays valid)."""
    data = tar.read_bytes()
    at = -1
    for _ in range(nth + 1):
        at = data.index(b"\xff\xd8", at + 1)
    at += 600
    tar.write_bytes(data[:at] + b"\xff\xd9" * 40 + data[at + 80 :])


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The embedded digits as JPEG: the eval batch (359 images) is large enough for DALI 2.4's CPU
    decoder to crash with SIGSEGV on a corrupt image, as the issue reported."""
    out = tmp_path_factory.mktemp("digits") / "digits"
    assert make_shards(["--dataset", "digits", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    return out


def trainer_argv(root: Path, out: Path, *extra: str) -> list[str]:
    # a small network; eval_batch_size stays the demo's 360, the batch size the crash needed. The eval
    # preset (no colour or blur): the crash is in the decoder, before any augmentation, and the default
    # preset's four Numba operators cost about 60 s of compiling a trainer process on this machine
    return ["--config", "demo", f"output_dir={out}", f"data.root={root}", "max_steps=1", "log_every=1",
            "data.num_threads=2", "data.image_size=16", "model.proj_hidden=32", "model.proj_dim=32",
            "model.pred_hidden=8", "data.preset=eval", *extra]  # fmt: skip


def run_trainer(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The real entry point in its own process, so that a crash shows as its exit code."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "ensiam_fast.train", *trainer_argv(root, out, *extra)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "test"])
def test_corrupt_jpeg_through_the_trainer_with_the_monitor_on(digits, tmp_path, split):
    root = Path(shutil.copytree(digits, tmp_path / "bad"))
    corrupt_jpeg(root / f"{split}-000000.tar", nth=35)
    for attempt in range(2):  # the crash was intermittent (a loop of 6 crashed 6 times before the fix)
        proc = run_trainer(root, tmp_path / f"run{attempt}")
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"{split}-000000.tar, sample '{split}_" in lines[0]
        assert f"make_shards.py --verify {root} --drop-corrupt" in lines[0]
    # the fixing command fixes it: the bad sample leaves the shard and the manifest says so
    before = read_manifest(root).splits[split].num_samples
    assert make_shards(["--verify", str(root), "--drop-corrupt", "--workers", "1"]) == 0
    info = read_manifest(root).splits[split]
    assert info.num_samples == before - 1 and "dropped by --drop-corrupt" in info.skipped[-1]["reason"]
    # ... and training then runs: in this process (the data is clean now, no crash to contain; a
    # child would compile DALI's Numba operators again, about 14 s CPU)
    assert train.main(trainer_argv(root, tmp_path / "fixed", "knn_every=0")) == 0


def run_tiny(root: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    rc = train.main(["--config", "demo", f"output_dir={tmp_path / 'run'}", f"data.root={root}", *TINY])
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_truncated_tar_is_named(tmp_path, capsys):
    root = make_tiny_dataset(tmp_path / "ds")
    tar = root / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    rc, err = run_tiny(root, tmp_path, capsys)
    assert rc == 2 and f"shard {tar} is truncated" in one_error_line(err)


def test_index_that_does_not_match_its_tar_is_named(tmp_path, capsys):
    root = make_tiny_dataset(tmp_path / "ds")
    idx = root / "test-000000.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([f"v1.2 {len(lines) - 2}", *lines[1:-1]]) + "\n")  # one sample short
    rc, err = run_tiny(root, tmp_path, capsys)
    assert rc == 2 and f"the index {idx} lists 15 samples but the manifest says 16" in one_error_line(err)


@pytest.mark.parametrize("checked", [False, True])
def test_label_outside_num_classes_is_named(tmp_path, capsys, checked):
    # unchecked (a manifest from before verdicts): the loader checks every label itself; checked: the
    # verdict recorded 12 classes, so a class list cut afterwards makes the loader check the labels again
    root = make_tiny_dataset(tmp_path / "ds", checked=checked)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:10]  # labels 10 and 11 are now out of range
    manifest["num_classes"] = 10
    (root / "manifest.json").write_text(json.dumps(manifest))
    rc, err = run_tiny(root, tmp_path, capsys)
    line = one_error_line(err)
    assert rc == 2 and "train-000000.tar, sample 'train_000010': label 10 is outside 0..9" in line


def test_empty_split_is_named(tmp_path, capsys):
    root = make_tiny_dataset(tmp_path / "ds")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["test"].update(num_samples=0, shards=[], shard_sizes=[])
    (root / "manifest.json").write_text(json.dumps(manifest))
    rc, err = run_tiny(root, tmp_path, capsys)
    assert rc == 2 and "split 'test' of" in one_error_line(err) and "holds no samples" in err


def test_planted_idx_tmp_symlink_is_not_written_through(tmp_path):
    root = make_tiny_dataset(tmp_path / "ds")
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    idx = root / "train-000001.idx"
    original = idx.read_text()
    idx.unlink()
    (root / "train-000001.idx.tmp").symlink_to(target)
    with pytest.warns(UserWarning, match="regenerating"):
        build_loader(root, "train", batch_size=8, views=1, preset="eval")
    assert target.read_text() == "precious\n"
    assert idx.read_text() == original and not idx.is_symlink()


def test_planted_idx_symlink_is_replaced_not_followed(tmp_path):
    root = make_tiny_dataset(tmp_path / "ds")
    target = tmp_path / "victim.txt"
    idx = root / "train-000001.idx"
    idx.unlink()
    idx.symlink_to(target)  # dangling: the loader sees no index and makes one
    with pytest.warns(UserWarning, match="regenerating"):
        build_loader(root, "train", batch_size=8, views=1, preset="eval")
    assert not target.exists() and not idx.is_symlink()


def test_manifest_path_outside_the_dataset_is_refused(tmp_path):
    root = make_tiny_dataset(tmp_path / "ds")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(root / "train-000000.tar", outside / "x.tar")  # a real tar, without an index
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0] = "../outside/x.tar"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"lists the shard '\.\./outside/x\.tar', which is outside"):
        build_loader(root, "train", batch_size=8, views=1, preset="eval")
    assert sorted(p.name for p in outside.iterdir()) == ["x.tar"]  # no index written there
    assert make_shards(["--verify", str(root)]) == 1


def test_member_name_with_a_control_character_is_refused(tmp_path):
    root = make_tiny_dataset(tmp_path / "ds")
    tar = root / "train-000000.tar"
    buf = io.BytesIO()
    with tarfile.open(tar) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for i, m in enumerate(src.getmembers()):
            data = src.extractfile(m).read()
            if i == 0:
                m.name = "train_000000\nv1.2 0.jpg"  # a newline would inject a line into the index
            dst.addfile(m, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())
    (root / "train-000000.idx").unlink()
    with pytest.raises(ShardFormatError, match=r"train-000000\.tar has a member named .*control character"):
        with pytest.warns(UserWarning, match="regenerating"):
            build_loader(root, "train", batch_size=8, views=1, preset="eval")
    assert not (root / "train-000000.idx").exists()


def test_drop_corrupt_removes_the_bad_sample_and_says_so(tmp_path):
    """The repair the error lines point to, in process (its end-to-end run through the trainer and the
    command is the slow test above): the corrupt sample leaves its shard and the manifest records it."""
    root = make_tiny_dataset(tmp_path / "ds", size=64)  # 64x64: the JPEGs are long enough to corrupt
    tar = root / "train-000001.tar"
    corrupt_jpeg(tar, nth=3)
    assert make_shards(["--verify", str(root), "--drop-corrupt", "--workers", "1"]) == 0
    info = read_manifest(root).splits["train"]
    assert info.num_samples == 47 and info.shard_sizes[1] == 15
    assert "dropped by --drop-corrupt" in info.skipped[-1]["reason"]
    assert make_shards(["--verify", str(root), "--workers", "1"]) == 0  # clean now
