"""Readers for the on-disk dataset layouts that ``tools/make_shards.py`` converts, one module each.

``open_source(dataset, src)`` checks the layout and returns a :class:`Source`; see ``base`` for
what a reader provides.
"""

from __future__ import annotations

import os
from pathlib import Path

from ensiam_fast.shards.sources.base import (
    ArraySplit,
    FileSplit,
    Sample,
    Source,
    SourceLayoutError,
    pil_from_pixels,
    to_rgb8,
)
from ensiam_fast.shards.sources.cifar import open_cifar10, open_cifar100
from ensiam_fast.shards.sources.digits import digits_arrays, open_digits, stratified_split
from ensiam_fast.shards.sources.imagefolder import open_imagefolder
from ensiam_fast.shards.sources.stl10 import Stl10Split, open_stl10
from ensiam_fast.shards.sources.tiny_imagenet import open_tiny_imagenet
from ensiam_fast.shards.sources.webdataset import open_webdataset

DATASETS = ("cifar10", "cifar100", "stl10", "tiny-imagenet", "imagefolder", "digits", "webdataset")

OPENERS = {
    "cifar10": open_cifar10,
    "cifar100": open_cifar100,
    "stl10": open_stl10,
    "tiny-imagenet": open_tiny_imagenet,
    "imagefolder": open_imagefolder,
    "digits": open_digits,
    "webdataset": open_webdataset,  # --split/--classes: make_shards.py calls it with them
}


def open_source(dataset: str, src: str | os.PathLike | None, strict: bool = False) -> Source:
    """Open and check the source of ``dataset`` (one of :data:`DATASETS`); ``strict``: a layout
    oddity that is otherwise a warning (an empty class folder) is an error."""
    if dataset not in OPENERS:
        raise SourceLayoutError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if dataset == "imagefolder":
        return open_imagefolder(None if src is None else Path(src), strict=strict)
    return OPENERS[dataset](None if src is None else Path(src))


__all__ = [
    "DATASETS",
    "OPENERS",
    "ArraySplit",
    "FileSplit",
    "Sample",
    "Source",
    "SourceLayoutError",
    "Stl10Split",
    "digits_arrays",
    "open_source",
    "pil_from_pixels",
    "stratified_split",
    "to_rgb8",
]
