#!/usr/bin/env python
"""Benchmark tools/make_shards.py: conversion rate in images/s.

Synthetic sources, written once into a temporary folder in the real on-disk layouts:
  * 32x32 images in the CIFAR-10 pickle layout (smooth colour fields plus noise, so JPEG and PNG
    have work comparable to real photographs), converted to JPEG and to PNG;
  * ~500x375 JPEG files in the imagefolder layout (ImageNet-like), converted with the default
    (RGB JPEG bytes kept, each file checked by a 1/8-scale decode), with --reencode, and with
    --resize 160.
Each case runs with 1 and 2 worker processes; the figure is the median of --repeats runs of the whole
conversion (source reading, planning, encoding, tar writing, manifest), as images per wall-clock
second and per CPU-second (this process and its workers: robust when other jobs share the cores).
The baseline, in the same run, is the straightforward loop (Pillow fromarray + save, tarfile) on the
32x32 source. Prints one JSON object last.

    python tools/bench_make_shards.py --against REF [--small N --repeats R]

compares this checkout with the commit REF instead (e.g. the commit before a change to the
converter): the 32x32 JPEG and PNG conversions, one worker, each in its own process with the
package taken from this checkout or from ``git archive REF``, the two alternating run by run.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import photo_like  # tools/common.py: the checkout first on sys.path
from PIL import Image

from ensiam_fast.shards.convert import EncodeOptions, convert
from ensiam_fast.shards.sources import open_source


def write_cifar_like(root: Path, n: int, rng: np.random.Generator) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per = n // 6
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = photo_like(rng, per, 32, 32)
        batch = {
            b"data": images.transpose(0, 3, 1, 2).reshape(per, -1),
            b"labels": rng.integers(0, 10, per).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [str(i).encode() for i in range(10)]}))
    return folder


def write_imagefolder(root: Path, n: int, rng: np.random.Generator) -> Path:
    for i in range(n):
        w, h = (500, 375) if i % 2 else (375, 500)
        path = root / "train" / f"class{i % 10:02d}" / f"img{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, 1, h, w)[0]).save(path, quality=90)
    return root


def cpu_seconds() -> float:
    """User + system time of this process and of its reaped children (the pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_case(dataset: str, src: Path, work: Path, opts: EncodeOptions, workers: int, repeats: int) -> dict:
    """Median wall-clock rate, and the rate per CPU-second (robust when other jobs share the cores)."""
    rates, cpu_rates = [], []
    count = 0
    for _ in range(repeats):
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        manifest, _ = convert(open_source(dataset, src), out, opts, workers=workers, progress=False)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        count = sum(s.num_samples for s in manifest.splits.values())
        rates.append(count / seconds)
        cpu_rates.append(count / cpu)
    return {
        "images": count,
        "images_per_s": round(statistics.median(rates)),
        "images_per_cpu_s": round(statistics.median(cpu_rates)),
        "runs": [round(r) for r in rates],
    }


def naive_convert(src: Path, out: Path, fmt: str) -> int:
    """The baseline: the straightforward loop (Pillow's fromarray and save, tarfile), one process."""
    import io
    import tarfile

    from ensiam_fast.shards.sources import open_cifar10

    source = open_cifar10(src)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for split, reader in source.splits.items():
        with tarfile.open(out / f"{split}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for sample in reader.read(range(len(reader))):
                buf = io.BytesIO()
                img = Image.fromarray(sample.pixels)
                if fmt == "png":
                    img.save(buf, format="PNG")
                else:
                    img.save(buf, format="JPEG", quality=95, subsampling=0)
                for ext, data in ((fmt, buf.getvalue()), ("cls", str(sample.label).encode())):
                    info = tarfile.TarInfo(f"{split}_{sample.index:08d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                count += 1
    return count


def time_naive(src: Path, work: Path, fmt: str, repeats: int) -> dict:
    rates, cpu_rates = [], []
    for _ in range(repeats):
        shutil.rmtree(work / "naive", ignore_errors=True)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        count = naive_convert(src, work / "naive", fmt)
        rates.append(count / (time.perf_counter() - start))
        cpu_rates.append(count / (cpu_seconds() - cpu_start))
    return {
        "images": count,
        "images_per_s": round(statistics.median(rates)),
        "images_per_cpu_s": round(statistics.median(cpu_rates)),
        "runs": [round(r) for r in rates],
    }


CHILD = """
import json, resource, sys, time
from pathlib import Path
from ensiam_fast.shards.convert import EncodeOptions, convert
from ensiam_fast.shards.sources import open_source
src, out, fmt, shard_size = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
source = open_source("cifar10", src)
t0, c0 = time.perf_counter(), time.process_time()
manifest, _ = convert(source, out, EncodeOptions(fmt, 95, shard_size), workers=1, progress=False)
n = sum(s.num_samples for s in manifest.splits.values())
print(json.dumps({"images": n, "s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
"""


def against(ref: str, args: argparse.Namespace) -> dict:
    """This checkout against ``ref``, interleaved run by run, in separate processes."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "ref"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(repo), "archive", ref, "ensiam_fast", "pipelines"],
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        cifar = write_cifar_like(tmp / "cifar", args.small, rng)
        runs: dict = {}
        for rep in range(args.repeats):
            for fmt in ("jpg", "png"):
                order = [("this", repo), ("ref", old)] if rep % 2 == 0 else [("ref", old), ("this", repo)]
                for label, path in order:
                    out = tmp / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    env = {**os.environ, "PYTHONPATH": str(path)}
                    proc = subprocess.run([sys.executable, "-c", CHILD, str(cifar), str(out), fmt,
                                           str(args.shard_size)], capture_output=True, text=True, env=env,
                                          check=True)  # fmt: skip
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs.setdefault(f"32x32_{fmt}_{label}", []).append(r["images"] / r["cpu_s"])
                    print(f"{fmt} {label}: {r['images'] / r['s']:.0f} images/s, "
                          f"{r['images'] / r['cpu_s']:.0f} per CPU-s", flush=True)  # fmt: skip
    medians = {k: round(statistics.median(v)) for k, v in runs.items()}
    return {
        "benchmark": "make_shards --against",
        "ref": ref,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "images_per_cpu_s_median": medians,
        "this_over_ref_per_cpu_s": {
            fmt: round(medians[f"32x32_{fmt}_this"] / medians[f"32x32_{fmt}_ref"], 3) for fmt in ("jpg", "png")
        },
        "runs": {k: [round(x) for x in v] for k, v in runs.items()},
    }


def report(name: str, r: dict) -> None:
    print(
        f"{name:24s}: {r['images_per_s']:6d} images/s ({r['images_per_cpu_s']:6d} per CPU-s)  runs {r['runs']}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=30000, help="32x32 images (CIFAR layout)")
    p.add_argument("--large", type=int, default=600, help="~500x375 JPEG files (imagefolder layout)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--against", metavar="REF", help="compare the 32x32 conversions with the git commit REF")
    args = p.parse_args()
    if args.against:
        print(json.dumps(against(args.against, args)))
        return
    rng = np.random.default_rng(0)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cifar = write_cifar_like(tmp / "cifar", args.small, rng)
        folder = write_imagefolder(tmp / "folder", args.large, rng)
        large_shard = max(1, args.large // 8)  # several shards, so that two workers can share them
        cases = [
            ("32x32_jpg", "cifar10", cifar, EncodeOptions("jpg", 95, args.shard_size)),
            ("32x32_png", "cifar10", cifar, EncodeOptions("png", 95, args.shard_size)),
            ("500x375_keep_jpeg", "imagefolder", folder, EncodeOptions("jpg", 95, large_shard)),
            (
                "500x375_reencode",
                "imagefolder",
                folder,
                EncodeOptions("jpg", 95, large_shard, None, True),
            ),
            (
                "500x375_resize160",
                "imagefolder",
                folder,
                EncodeOptions("jpg", 95, large_shard, 160),
            ),
        ]
        for fmt in ("jpg", "png"):
            results[f"32x32_{fmt}_naive_baseline"] = r = time_naive(cifar, tmp / "work", fmt, args.repeats)
            report(f"32x32_{fmt}_naive_baseline", r)
        for name, dataset, src, opts in cases:
            for workers in (1, 2):
                r = time_case(dataset, src, tmp / "work", opts, workers, args.repeats)
                results[f"{name}_w{workers}"] = r
                report(f"{name}_w{workers}", r)
    summary = {
        "benchmark": "make_shards",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "pillow": Image.__version__,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "results": {k: v["images_per_s"] for k, v in results.items()},
        "per_cpu_second": {k: v["images_per_cpu_s"] for k, v in results.items()},
        "ratios": {
            "32x32_jpg_w1_over_naive_per_cpu_s": round(
                results["32x32_jpg_w1"]["images_per_cpu_s"] / results["32x32_jpg_naive_baseline"]["images_per_cpu_s"],
                2,
            ),
            "32x32_png_w1_over_naive_per_cpu_s": round(
                results["32x32_png_w1"]["images_per_cpu_s"] / results["32x32_png_naive_baseline"]["images_per_cpu_s"],
                2,
            ),
            "32x32_jpg_2w_over_1w": round(
                results["32x32_jpg_w2"]["images_per_s"] / results["32x32_jpg_w1"]["images_per_s"], 2
            ),
            "32x32_png_over_jpg_2w": round(
                results["32x32_png_w2"]["images_per_s"] / results["32x32_jpg_w2"]["images_per_s"], 2
            ),
            "500x375_keep_over_reencode_2w": round(
                results["500x375_keep_jpeg_w2"]["images_per_s"] / results["500x375_reencode_w2"]["images_per_s"],
                2,
            ),
        },
        "target_32x32_images_per_s": 5000,
        "runs": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
