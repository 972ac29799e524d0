"""CIFAR-10 and CIFAR-100 (the python pickles of ``cifar-10-batches-py/`` and ``cifar-100-python/``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ensiam_fast.shards.sources.base import ArraySplit, Source, SourceLayoutError, _locate, _need, _stat_fingerprint


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


# What a CIFAR pickle needs: numpy arrays (rebuilt through these) and plain containers, strings,
# bytes and numbers (which need no global at all). Anything else could run code: refused.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 (a re-pickled release)
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads only arrays, lists, dicts, strings, bytes and numbers; never imports anything else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}, which a CIFAR pickle never does (only arrays, lists, dicts, "
            "strings, bytes and numbers are loaded); the file is not the original release"
        )


def _load_pickle(path: Path, dataset: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a broken release
        raise SourceLayoutError(f"{dataset}: {path} is not a readable CIFAR pickle ({e})") from e
    if not isinstance(raw, dict):
        raise SourceLayoutError(f"{dataset}: {path} should hold a dict, found {type(raw).__name__}")
    return {_text(k): v for k, v in raw.items()}


def _cifar_arrays(path: Path, label_key: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path, dataset)
    for key in ("data", label_key):
        if key not in batch:
            raise SourceLayoutError(f"{dataset}: {path} lacks the key {key!r}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise SourceLayoutError(
            f"{dataset}: {path}: 'data' should be (N, 3072) with N labels, found {data.shape} and {len(labels)} labels"
        )
    # Rows hold the red, green, blue 32x32 planes one after another.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def open_cifar10(src: Path | None) -> Source:
    root = _locate(src, "cifar10", "cifar-10-batches-py", "batches.meta")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    files = [_need(root / n, f"the CIFAR-10 file {n}", "cifar10") for n in names]
    meta = _load_pickle(root / "batches.meta", "cifar10")
    if "label_names" not in meta:
        raise SourceLayoutError(f"cifar10: {root / 'batches.meta'} lacks the key 'label_names'")
    parts = [_cifar_arrays(root / f"data_batch_{i}", "labels", "cifar10") for i in range(1, 6)]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _cifar_arrays(root / "test_batch", "labels", "cifar10")
    return Source(
        "cifar10",
        [_text(n) for n in meta["label_names"]],
        {
            "train": ArraySplit(train_x, train_y, "data_batch_1..5"),
            "test": ArraySplit(test_x, test_y, "test_batch"),
        },
        _stat_fingerprint(files, root),
    )


def open_cifar100(src: Path | None) -> Source:
    root = _locate(src, "cifar100", "cifar-100-python", "meta")
    files = [_need(root / n, f"the CIFAR-100 file {n}", "cifar100") for n in ("train", "test", "meta")]
    meta = _load_pickle(root / "meta", "cifar100")
    if "fine_label_names" not in meta:
        raise SourceLayoutError(f"cifar100: {root / 'meta'} lacks the key 'fine_label_names'")
    train_x, train_y = _cifar_arrays(root / "train", "fine_labels", "cifar100")
    test_x, test_y = _cifar_arrays(root / "test", "fine_labels", "cifar100")
    extra = {}
    if "coarse_label_names" in meta:
        extra["coarse_classes"] = [_text(n) for n in meta["coarse_label_names"]]
    return Source(
        "cifar100",
        [_text(n) for n in meta["fine_label_names"]],
        {"train": ArraySplit(train_x, train_y, "train"), "test": ArraySplit(test_x, test_y, "test")},
        _stat_fingerprint(files, root),
        extra=extra,
    )
