#!/usr/bin/env python
"""Convert a dataset to WebDataset shards with DALI indices, or verify converted shards.

    python tools/make_shards.py --dataset cifar10 --src ~/data --out shards/cifar10 [--format png]
    python tools/make_shards.py --dataset digits            # the embedded default, into shards/digits
    python tools/make_shards.py --verify shards/cifar10

Running the same command again resumes an interrupted conversion. The work is done by
``ensiam_fast.shards.convert`` (engine) and ``ensiam_fast.shards.sources`` (layout readers).
"""

from __future__ import annotations

import sys
from pathlib import Path

# the checkout this script sits in, first on the path: it runs without an install (or with one elsewhere)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensiam_fast.shards.cli import main

if __name__ == "__main__":
    sys.exit(main())
