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

import common  # noqa: F401  (tools/common.py: the checkout first on sys.path)

from ensiam_fast.shards.cli import main

if __name__ == "__main__":
    sys.exit(main())
