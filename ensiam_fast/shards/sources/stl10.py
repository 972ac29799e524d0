"""STL-10 (the ``stl10_binary/`` release: ``{train,test,unlabeled}_X.bin`` and ``*_y.bin``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ensiam_fast.shards.sources.base import (
    LabelledRows,
    Sample,
    Source,
    SourceLayoutError,
    _locate,
    _need,
    _stat_fingerprint,
)

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL10_SIDE = 96


class Stl10Split(LabelledRows):
    """One STL-10 ``*_X.bin`` (read lazily through a memmap: the unlabelled file is 2.6 GB)."""

    def __init__(self, x_path: Path, labels: np.ndarray | None, count: int):
        self.x_path, self.labels, self.count = x_path, labels, count

    def __len__(self) -> int:
        return self.count

    def read(self, indices: Sequence[int]) -> Iterator[Sample]:
        side = STL10_SIDE
        indices = np.asarray(indices, dtype=np.int64)
        raw = np.memmap(self.x_path, dtype=np.uint8, mode="r", shape=(self.count, 3, side, side))
        # Read in file order (one pass over the memmap), yield in the order asked for.
        order = np.argsort(indices, kind="stable")
        block = np.empty((len(indices), side, side, 3), dtype=np.uint8)
        # Each channel is stored column-major: (N, C, x, y) -> (N, y, x, C).
        block[order] = raw[indices[order]].transpose(0, 3, 2, 1)
        del raw
        for j, i in enumerate(indices.tolist()):
            yield Sample(i, self.label(i), f"{self.x_path.name}#{i}", pixels=block[j])


def open_stl10(src: Path | None) -> Source:
    root = _locate(src, "stl10", "stl10_binary", "train_X.bin")
    image_bytes = 3 * STL10_SIDE * STL10_SIDE
    splits: dict[str, Stl10Split] = {}
    files = []
    notes = []
    for split in ("train", "test", "unlabeled"):
        x_path = root / f"{split}_X.bin"
        if split == "unlabeled" and not x_path.exists():
            notes.append(f"stl10: {x_path} not found, so the 'unlabeled' split is left out")
            continue
        _need(x_path, f"the STL-10 image file {x_path.name}", "stl10")
        size = x_path.stat().st_size
        if size % image_bytes:
            raise SourceLayoutError(
                f"stl10: {x_path} is {size} bytes, not a multiple of {image_bytes} (3x96x96); "
                "the file is truncated or not an STL-10 binary"
            )
        count = size // image_bytes
        files.append(x_path)
        labels = None
        if split != "unlabeled":
            y_path = _need(root / f"{split}_y.bin", f"the STL-10 label file {split}_y.bin", "stl10")
            files.append(y_path)
            raw = np.fromfile(y_path, dtype=np.uint8)
            if len(raw) != count or (count and (raw.min() < 1 or raw.max() > 10)):
                raise SourceLayoutError(
                    f"stl10: {y_path} should hold {count} labels in 1..10 (one per image of "
                    f"{x_path.name}), found {len(raw)} values"
                )
            labels = raw.astype(np.int64) - 1  # 1..10 on disk, 0..9 in the shards
        splits[split] = Stl10Split(x_path, labels, count)
    classes = STL10_CLASSES
    names_file = root / "class_names.txt"
    if names_file.exists():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(classes) != 10:
            raise SourceLayoutError(f"stl10: {names_file} should name 10 classes, found {len(classes)}")
    return Source("stl10", classes, splits, _stat_fingerprint(files, root), notes=notes)
