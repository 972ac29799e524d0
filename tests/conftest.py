"""Shared fixtures: tiny datasets in the shard format, made inside the tests (no downloads)."""

from __future__ import annotations

import importlib.util
import io
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ensiam_fast.shards import Manifest, SplitInfo, shard_name, write_manifest, write_shard
from ensiam_fast.shards.format import MAX_PIXELS
from ensiam_fast.shards.verdict import make_verdict

# tools/ importable as its scripts see it (``import common``, ``import runlog``): once, for every test file
TOOLS = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


def load_tool(name: str):
    """tools/NAME.py as a module (the tools are scripts, not a package), registered in sys.modules."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free on this host now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def synthetic_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A class-dependent colour blob on noise: distinct enough for kNN, varied enough for augmentation."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 64, size=(h, w, 3))
    colour = np.array([(label * 53) % 256, (label * 97) % 256, (label * 151) % 256])
    cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 3) ** 2
    base[mask] = colour
    return base.astype(np.uint8)


def make_tiny_dataset(
    root: Path,
    splits: dict[str, tuple[int, bool]] | None = None,
    *,
    size: int = 32,
    num_classes: int = 12,
    shard_size: int = 16,
    seed: int = 0,
    checked: bool = True,
) -> Path:
    """Write a tiny dataset: ``splits`` maps name -> (num_samples, labeled). Labels go up to 11,
    so multi-digit ``.cls`` values are exercised. ``checked``: each split's content verdict is
    recorded as a conversion records it (every image was just encoded here); False: a manifest
    from before verdicts, which the loaders warn about."""
    splits = splits or {"train": (48, True), "test": (24, True)}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    infos = {}
    for split, (n, labeled) in splits.items():
        labels = np.arange(n) % num_classes
        names, sizes = [], []
        for s, start in enumerate(range(0, n, shard_size)):
            samples = []
            for i in range(start, min(n, start + shard_size)):
                parts = {"jpg": encode_jpeg(synthetic_image(rng, int(labels[i]), size))}
                if labeled:
                    parts["cls"] = str(int(labels[i])).encode()
                samples.append((f"{split}_{i:06d}", parts))
            rec = write_shard(root / shard_name(split, s), samples)
            names.append(rec.name)
            sizes.append(rec.num_samples)
        infos[split] = SplitInfo(num_samples=n, shards=names, labeled=labeled, shard_sizes=sizes)
        if checked:
            infos[split].check = make_verdict(root, infos[split], "conversion", [], MAX_PIXELS, num_classes)
    write_manifest(
        root,
        Manifest(
            dataset="tiny",
            classes=[f"class_{c}" for c in range(num_classes)],
            splits=infos,
            image_size=[size, size],
        ),
    )
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """48 labelled train, 24 labelled test and 32 unlabelled 32x32 images, 12 classes."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_dataset(root, {"train": (48, True), "test": (24, True), "unlabeled": (32, False)})


# The session's trained run: the demo config cut to CPU size (16x16 crops of the tiny dataset, small
# heads), 3 steps, the kNN monitor at step 0 and at the end. TINY_RUN is its whole command line but
# output_dir and data.root, so a test can resume a copy of it with the same settings.
TINY_RUN = [
    "--config", "demo", "batch_size=8", "epochs=1", "max_steps=3", "log_every=1", "checkpoint_every=1000",
    "knn_every=1", "knn_k=5", "eval_batch_size=16", "data.image_size=16", "data.num_threads=1",
    "model.proj_hidden=32", "model.proj_dim=32", "model.pred_hidden=8", "model.channels_last=false",
    "model.cifar_stem=true",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dataset) -> Path:
    """A run directory trained once per session by the real entry point (``train.main``). Read it
    only: a test that writes into a run works on ``copy_run(tiny_run, tmp_path)``."""
    from ensiam_fast import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    assert train.main([*TINY_RUN, f"output_dir={out}", f"data.root={tiny_dataset}"]) == 0
    return out


def copy_run(run: Path, where: Path) -> Path:
    """A copy of a finished run directory under ``where`` (its own to write in)."""
    import shutil

    return Path(shutil.copytree(run, Path(where) / run.name))
