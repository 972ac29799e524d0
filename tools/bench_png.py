#!/usr/bin/env python
"""Size and CPU time of make_shards' PNG writer against Pillow's at its compression levels (32x32).

    python tools/bench_png.py

Two sets: scikit-learn's digits upscaled to 32x32 (flat backgrounds) and 600 photo-like 32x32
images (smooth colour gradients plus noise). Per writer: the mean file size and the best of three
CPU times per image (``--repeats``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from common import photo_like  # tools/common.py: the checkout first on sys.path
from PIL import Image

from ensiam_fast.shards.encode import encode_png  # noqa: E402
from ensiam_fast.shards.sources import digits_arrays  # noqa: E402


def pillow(level: int):
    def encode(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=level)
        return buf.getvalue()

    return encode


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per writer; the best counts")
    args = ap.parse_args(argv)
    results = {}
    sets = {"digits": digits_arrays()[0], "photo32": photo_like(np.random.default_rng(0), 600, 32, 32)}
    writers = [("ours", encode_png)] + [(f"pillow{level}", pillow(level)) for level in (0, 1, 3, 6, 9)]
    for name, images in sets.items():
        for label, encode in writers:
            for a in images[:20]:
                encode(a)  # warm-up
            best, sizes = float("inf"), []
            for _ in range(max(1, args.repeats)):
                t0 = time.process_time()
                sizes = [len(encode(a)) for a in images]
                best = min(best, time.process_time() - t0)
            results[f"{name}/{label}"] = {
                "bytes": round(float(np.mean(sizes))),
                "us": round(best / len(images) * 1e6, 1),
            }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
