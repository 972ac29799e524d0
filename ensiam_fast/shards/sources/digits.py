"""scikit-learn's handwritten digits: the embedded dataset that needs no download."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from ensiam_fast.shards.sources.base import ArraySplit, Source


def digits_arrays(side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16) as (N, side, side, 3) uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(x).resize((side, side), Image.BILINEAR)) for x in small])
    return np.repeat(big[..., None], 3, axis=3), digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle puts ``round(test_fraction * n)`` samples in test; indices sorted."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def open_digits(src: Path | None = None) -> Source:
    images, labels = digits_arrays()
    train, test = stratified_split(labels)
    h = hashlib.sha256(images.tobytes())
    h.update(labels.tobytes())
    return Source(
        "digits",
        [str(d) for d in range(10)],
        {
            "train": ArraySplit(images[train], labels[train], "sklearn-digits"),
            "test": ArraySplit(images[test], labels[test], "sklearn-digits"),
        },
        h.hexdigest()[:16],
        extra={"source": "sklearn.datasets.load_digits, 8x8 upscaled to 32x32, 80/20 per class, seed 0"},
    )
