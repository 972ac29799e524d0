#!/usr/bin/env python
"""Benchmark ``make_shards.py --verify``: images checked per second (header, decode, label).

Writes ImageNet-like shards once into a temporary folder (~500x375 photo-like RGB JPEGs, ``--quality``,
``--shard-size`` per tar, labels 0..99) and times ``verify_dataset`` with 1 and 2 jobs, alternating,
``--repeats`` times each; the figure is the median images per wall-clock second. The baseline, in
the same run, is Pillow decoding the same images at full size in one process (what ``--verify``
did before its decode check read JPEGs at 1/8 scale). Prints one JSON object last.

    python tools/bench_verify.py [--images N --shard-size S --repeats R]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import photo_like  # tools/common.py: the checkout first on sys.path
from PIL import Image

from ensiam_fast.shards.format import shard_name, write_shard
from ensiam_fast.shards.manifest import Manifest, SplitInfo, write_manifest
from ensiam_fast.shards.verify import verify_dataset


def make_dataset(root: Path, n: int, shard_size: int, quality: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    jpegs = []
    for start in range(0, n, 50):
        for px in photo_like(rng, min(50, n - start), 375, 500):
            buf = io.BytesIO()
            Image.fromarray(px).save(buf, "JPEG", quality=quality)
            jpegs.append(buf.getvalue())
    names, sizes = [], []
    for s, start in enumerate(range(0, n, shard_size)):
        items = [
            (f"train_{i:08d}", {"jpg": jpegs[i], "cls": str(i % 100).encode()})
            for i in range(start, min(n, start + shard_size))
        ]
        rec = write_shard(root / shard_name("train", s), items)
        names.append(rec.name)
        sizes.append(rec.num_samples)
    write_manifest(root, Manifest("bench", [str(c) for c in range(100)], {"train": SplitInfo(n, names, True, sizes)}))
    return jpegs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--shard-size", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (97 gives ImageNet's ~110 KiB per image)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        root = Path(tmp)
        jpegs = make_dataset(root, args.images, args.shard_size, args.quality)
        times: dict[str, list[float]] = {"baseline_full_decode_1proc": [], "verify_jobs1": [], "verify_jobs2": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for data in jpegs:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
            times["baseline_full_decode_1proc"].append(time.perf_counter() - t0)
            for jobs in (1, 2):
                t0 = time.perf_counter()
                report = verify_dataset(root, workers=jobs)
                times[f"verify_jobs{jobs}"].append(time.perf_counter() - t0)
                assert report.ok, report.problems[:3]
        rates = {k: round(args.images / statistics.median(v), 1) for k, v in times.items()}
        mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
        result = {"images": args.images, "mean_jpeg_kib": round(mean_kb, 1), "images_per_s": rates,
                  "hours_per_million": {k: round(1e6 / r / 3600, 2) for k, r in rates.items()}}  # fmt: skip
        print(json.dumps(result))


if __name__ == "__main__":
    main()
