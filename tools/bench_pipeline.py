"""Throughput of the K-view loaders: DALI (``ensiam_fast.data.build_loader``) against the torchvision
reference (``ensiam_fast.data.torch``), on the same CPU budget, side by side in one run.

    python tools/bench_pipeline.py                       # full grid (a few minutes on 2 cores)
    python tools/bench_pipeline.py --quick               # 32x32 + 224x224, default preset, K=4 only
    python tools/bench_pipeline.py --sizes 32 --presets default --views 4 --repeats 5
    python tools/bench_pipeline.py --device gpu          # DALI on the GPU (mixed decoder); reference feeds cuda

Data is synthetic and written into shards in a temporary directory: 32x32 JPEGs (CIFAR-like) and
~500x375 JPEGs cropped to 224x224 views (ImageNet-like). Each measurement is one full epoch
(``set_epoch`` then iterate), loaders built once per configuration; the backends alternate
(which one goes first flips every repeat) so machine noise hits both, and the medians over
``--repeats`` epochs after one warm-up epoch are reported with their ratio DALI/reference.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # tools/common.py: the checkout first on sys.path
import numpy as np
import torch
from PIL import Image

from ensiam_fast.data.torch import build_reference_loader  # noqa: E402
from ensiam_fast.shards import Manifest, SplitInfo, shard_name, write_manifest, write_shard  # noqa: E402
from pipelines.presets import check_views, get_preset  # noqa: E402

# Targets from the issue: DALI/reference on the 2-core CPU box, views/s on one H100.
CPU_RATIO_TARGET = {32: 6.0, 224: 2.0}
GPU_VIEWS_TARGET = {32: 100_000, 224: 8_000}
SOURCE_SIZE = {32: (32, 32), 64: (64, 64), 224: (500, 375)}  # (W, H) of the stored JPEGs


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    """Smooth colour fields plus sensor-like noise: a JPEG with roughly a photo's entropy."""
    coarse = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = smooth + rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_bench_dataset(root: Path, size: int, num_images: int, shard_size: int = 1024, seed: int = 0) -> Path:
    """A labelled 'train' split of synthetic JPEGs whose views are ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    width, height = SOURCE_SIZE[size]
    names, sizes = [], []
    for s, start in enumerate(range(0, num_images, shard_size)):
        samples = []
        for i in range(start, min(num_images, start + shard_size)):
            jpg = synthetic_jpeg(rng, width, height, quality=95 if size == 32 else 90)
            samples.append((f"img_{i:07d}", {"jpg": jpg, "cls": str(i % 100).encode()}))
        rec = write_shard(root / shard_name("train", s), samples)
        names.append(rec.name)
        sizes.append(rec.num_samples)
    same_size = [height, width] if (width, height) == (size, size) else None
    write_manifest(
        root,
        Manifest(
            dataset=f"bench{size}",
            classes=[str(c) for c in range(100)],
            splits={"train": SplitInfo(num_images, names, True, sizes)},
            image_size=same_size,
        ),
    )
    return root


def build(backend: str, root: Path, *, size: int, preset: str, views: int, batch: int, threads: int, device: str):
    kw = dict(
        batch_size=batch,
        views=views,
        preset=preset,
        device=device,
        seed=0,
        train=True,
        image_size=size,
        num_threads=threads,
    )
    if backend == "torch":
        return build_reference_loader(root, "train", **kw)
    from ensiam_fast.data import build_loader

    return build_loader(root, "train", backend="dali", **kw)


def time_epoch(loader, epoch: int) -> tuple[float, float, int]:
    """(seconds in set_epoch, seconds iterating one full epoch, images yielded).

    Kept apart because the DALI loader builds a fresh pipeline in ``set_epoch`` (a fixed cost per
    epoch, large for RandAugment graphs) while the reference forks its workers inside the iteration.
    """
    t0 = time.perf_counter()
    loader.set_epoch(epoch)
    t1 = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[1]
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return t1 - t0, time.perf_counter() - t1, n


def bench_config(roots, backends, *, size, preset, views, batch, threads, device, repeats) -> dict:
    loaders, errors = {}, {}
    for b in backends:
        dev = device if b == "dali" else ("cuda" if device == "gpu" else "cpu")
        try:
            loaders[b] = build(
                b, roots[size], size=size, preset=preset, views=views, batch=batch, threads=threads, device=dev
            )
        except Exception as e:  # a missing backend is reported in the JSON, not fatal for the other one
            errors[b] = f"{type(e).__name__}: {e}"
    rates: dict[str, list[float]] = {b: [] for b in loaders}
    with_setup: dict[str, list[float]] = {b: [] for b in loaders}
    setups: dict[str, list[float]] = {b: [] for b in loaders}
    order = list(loaders)
    for rep in range(repeats + 1):
        for b in order if rep % 2 == 0 else order[::-1]:
            setup, seconds, n = time_epoch(loaders[b], rep)
            if rep > 0:  # the first epoch warms the page cache and allocators
                rates[b].append(n / seconds)
                with_setup[b].append(n / (setup + seconds))
                setups[b].append(setup)
    row = {"size": size, "preset": preset, "views": views, "batch": batch}
    for b in rates:
        med = statistics.median(rates[b])
        row[f"{b}_images_s"] = round(med, 1)
        row[f"{b}_views_s"] = round(med * views, 1)
        row[f"{b}_images_s_all"] = [round(v, 1) for v in rates[b]]
        row[f"{b}_set_epoch_s"] = round(statistics.median(setups[b]), 3)
        row[f"{b}_images_s_incl_set_epoch"] = round(statistics.median(with_setup[b]), 1)
    for b, err in errors.items():
        row[f"{b}_error"] = err
    if "dali" in rates and "torch" in rates:
        row["ratio_dali_over_torch"] = round(row["dali_images_s"] / row["torch_images_s"], 2)
        row["ratio_incl_set_epoch"] = round(
            row["dali_images_s_incl_set_epoch"] / row["torch_images_s_incl_set_epoch"], 2
        )
    return row


def check_targets(rows: list[dict], device: str) -> dict:
    """Each default-preset K=4 row against its target: the CPU's DALI/torch ratio or the GPU's views/s."""
    name, field, targets = {
        "cpu": ("cpu_ratio", "ratio_dali_over_torch", CPU_RATIO_TARGET),
        "gpu": ("gpu_views_s", "dali_views_s", GPU_VIEWS_TARGET),
    }[device]
    out = {}
    for r in rows:
        if r["preset"] == "default" and r["views"] == 4 and field in r:
            target = targets[r["size"]]
            out[f"{name}_{r['size']}"] = {"target": target, "got": r[field], "met": r[field] >= target}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="32,224", help="comma list of view sides, from 32 and 224")
    ap.add_argument("--presets", default="default,very_strong")
    ap.add_argument("--views", default="2,4,8", help="comma list of K")
    ap.add_argument("--backends", default="dali,torch")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers (same CPU budget)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per backend (after one warm-up)")
    ap.add_argument("--images32", type=int, default=2048, help="images in the 32x32 dataset (one epoch)")
    ap.add_argument("--images224", type=int, default=256, help="images in the 224x224 dataset (one epoch)")
    ap.add_argument("--batch32", type=int, default=128)
    ap.add_argument("--batch224", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="default preset, K=4, 2 repeats, smaller epochs")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.presets, args.views, args.repeats = "default", "4", 2
        args.images32, args.images224 = min(args.images32, 1024), min(args.images224, 128)
    batch = {32: args.batch32, 224: args.batch224}
    try:  # the flags checked by the rules' homes before any work (a bad K or preset was a per-row 'error' field, rc 0)
        sizes = [int(s) for s in args.sizes.split(",")]
        if any(s not in batch for s in sizes):  # SOURCE_SIZE also has 64, which has no --batch flag
            raise ValueError(f"--sizes must be taken from {sorted(batch)}, got {args.sizes}")
        for k in (int(v) for v in args.views.split(",")):
            check_views(k)
        for name in args.presets.split(","):
            get_preset(name)
    except ValueError as e:
        print(f"error: --sizes {args.sizes} --presets {args.presets} --views {args.views}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    backends = args.backends.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        roots = {}
        for s in sizes:
            n = args.images32 if s == 32 else args.images224
            roots[s] = write_bench_dataset(Path(tmp) / f"s{s}", s, n)
        for s in sizes:
            for preset in args.presets.split(","):
                for k in (int(v) for v in args.views.split(",")):
                    row = bench_config(
                        roots,
                        backends,
                        size=s,
                        preset=preset,
                        views=k,
                        batch=batch[s],
                        threads=args.threads,
                        device=args.device,
                        repeats=args.repeats,
                    )
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    result = {
        **common.result_head("bench_pipeline"),
        "device": args.device,
        "threads": args.threads,
        "repeats": args.repeats,
        "images": {"32": args.images32, "224": args.images224},
        "results": rows,
        "targets": check_targets(rows, args.device),
    }
    result["machine"]["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return common.print_result(result)


if __name__ == "__main__":
    main()
