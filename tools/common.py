"""What the scripts in tools/ share: the path set-up, the JSON last line, synthetic images.

Importing this module is the path set-up: it puts the checkout it sits in first on ``sys.path``, so
``python tools/X.py`` runs from a checkout that is not installed (or with an install elsewhere). A
script in tools/ therefore starts with ``import common`` (Python puts the script's folder, tools/,
on the path), before it imports ``ensiam_fast`` or ``pipelines``. ``metrics.jsonl`` is read by
``ensiam_fast.metrics.read_metrics``, for the tools as for the trainer.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def last_json(text: str) -> dict | None:
    """The JSON object on the last line of ``text`` that starts with ``{`` (a command's result line);
    None when there is none or it is not complete JSON (a process killed while printing it)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except json.JSONDecodeError:
                return None
            return found if isinstance(found, dict) else None
    return None


def result_head(tool: str) -> dict:
    """The first keys of a benchmark's result line: the tool, the local date and time, the machine."""
    return {
        "tool": tool,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
    }


def print_result(record: dict) -> dict:
    """Print ``record`` as the command's JSON last line (what :func:`last_json` reads back); return it."""
    print(json.dumps(record), flush=True)
    return record


def photo_like(rng, n: int, h: int, w: int):
    """``n`` RGB uint8 images ``(n, h, w, 3)`` that compress and decode like photographs: smooth
    colour fields (a 4x4 random grid upscaled bicubically) plus sensor-like Gaussian noise."""
    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(coarse[i]).resize((w, h), Image.BICUBIC))
    noise = rng.normal(0, 8, out.shape)
    return np.clip(out + noise, 0, 255).astype(np.uint8)
