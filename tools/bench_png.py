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
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ensiam_fast.shards.encode import encode_png  # noqa: E402
from ensiam_fast.shards.sources import digits_arrays  # noqa: E402


def photo_like(n: int = 600, side: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    grey = np.stack(
        [
            128 + 60 * np.sin(xx / 5 + i) + 40 * np.cos(yy / 7 + 2 * i) + rng.normal(0, 12, (side, side))
            for i in range(n)
        ]
    )
    img = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=3)
    img[..., 1] = np.roll(img[..., 1], 3, axis=2)
    return img


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
    sets = {"digits": digits_arrays()[0], "photo32": photo_like()}
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
