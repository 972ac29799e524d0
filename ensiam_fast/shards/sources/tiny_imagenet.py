"""Tiny-ImageNet (the ``tiny-imagenet-200/`` release: ``wnids.txt``, ``train/<wnid>/images``, ``val``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ensiam_fast.shards.sources.base import (
    FileSplit,
    Source,
    SourceLayoutError,
    _image_files,
    _locate,
    _need,
    _stat_fingerprint,
)


def open_tiny_imagenet(src: Path | None) -> Source:
    root = _locate(src, "tiny-imagenet", "tiny-imagenet-200", "wnids.txt")
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    train_paths, train_labels = [], []
    for label, wnid in enumerate(wnids):
        folder = _need(root / "train" / wnid / "images", f"the training images of {wnid}", "tiny-imagenet")
        for p in _image_files(folder):
            train_paths.append(p.relative_to(root))
            train_labels.append(label)
    ann = _need(root / "val" / "val_annotations.txt", "the validation labels", "tiny-imagenet")
    val_dir = _need(root / "val" / "images", "the validation images folder", "tiny-imagenet")
    index = {w: i for i, w in enumerate(wnids)}
    val_paths, val_labels = [], []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise SourceLayoutError(
                f"tiny-imagenet: {ann} line {n}: expected 'FILE<TAB>WNID...' with a wnid from wnids.txt, found {line!r}"
            )
        _need(val_dir / fields[0], f"the validation image listed on line {n} of {ann.name}", "tiny-imagenet")
        val_paths.append(Path("val") / "images" / fields[0])
        val_labels.append(index[fields[1]])
    order = np.argsort([str(p) for p in val_paths], kind="stable")
    val_paths = [val_paths[i] for i in order]
    val_labels = [val_labels[i] for i in order]
    descriptions = {}
    if (root / "words.txt").exists():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, words = line.partition("\t")
            descriptions[wnid.strip()] = words.strip()
    files = [root / p for p in train_paths + val_paths]
    fingerprint = _stat_fingerprint([root / "wnids.txt", ann, *files], root)
    return Source(
        "tiny-imagenet",
        wnids,
        {
            "train": FileSplit(root, [str(p) for p in train_paths], train_labels),
            "val": FileSplit(root, [str(p) for p in val_paths], val_labels),
        },
        fingerprint,
        extra={"class_descriptions": [descriptions.get(w, "") for w in wnids]} if descriptions else {},
    )
