"""What a loader reads, resolved once: the split (manifest read once), the epoch geometry, device, preset.

``loader_spec(root, split, ...)`` reads ``manifest.json`` once into a :class:`SplitSpec` (shard files,
sizes, labels) and checks and resolves every loader argument into a :class:`LoaderSpec`; the DALI and
torch loaders both take one, so their checks and their arithmetic (samples per rank, batches per
epoch) live here only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensiam_fast.errors import UserError
from ensiam_fast.shards.format import ShardFormatError, shard_bounds
from ensiam_fast.shards.manifest import read_manifest, split_files
from ensiam_fast.shards.verdict import gate_split
from pipelines.presets import AugPreset, check_views, get_preset


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from a tuple of non-negative ints (statistically independent streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def resolve_preset(preset: str | AugPreset, train: bool) -> AugPreset:
    """The preset to apply: evaluation forces 'eval' unless 'linear' is asked for."""
    resolved = get_preset(preset)
    if not train and resolved.name not in ("linear", "eval"):
        return get_preset("eval")
    return resolved


def resolve_image_size(image_size: int | None, manifest_size: list[int] | None, root: Path) -> int:
    if image_size is not None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        return image_size
    if not manifest_size:
        raise LoaderError(f"{root}/manifest.json has no image_size (its images differ in size): pass image_size=...")
    return int(manifest_size[0])


def check_not_empty(root: Path, split: str, num_samples: int) -> None:
    """An empty split cannot feed a loader: say so, not some batch-size arithmetic later."""
    if num_samples < 1:
        raise ShardFormatError(
            f"split {split!r} of {root} holds no samples (manifest.json); choose another split or re-make "
            "the dataset with tools/make_shards.py"
        )


class LoaderError(UserError, ValueError):
    """Data that the loader cannot read as asked (a batch larger than the split, no image size): the
    user's data or settings, so one line rather than a traceback."""


@dataclass(frozen=True)
class SplitSpec:
    """One split (or several joined with '+') of a dataset, as read from its manifest."""

    root: Path
    name: str
    tars: list[str]
    idxs: list[str]
    shard_sizes: list[int]  # per tar; empty when an older manifest does not list them
    num_samples: int
    labeled: bool
    num_classes: int
    image_size: list[int] | None  # (H, W) when every image has it
    # the tars (paths as in ``tars``) that passed a content check and are unchanged since (shards/verdict.py)
    trusted: frozenset[str] = frozenset()

    @property
    def checked(self) -> bool:
        """Every tar passed a content check and is unchanged since."""
        return all(t in self.trusted for t in self.tars)


def read_split(root: str | os.PathLike, split: str) -> SplitSpec:
    """Read ``root/manifest.json`` once and resolve ``split``'s files (checked to exist, inside root);
    a split whose last content check failed is refused here (``shards.verdict.gate_split``)."""
    root = Path(root)
    manifest = read_manifest(root)
    info = manifest.split(split)
    tars, idxs = split_files(root, info)
    check_not_empty(root, split, info.num_samples)
    trusted = frozenset(str(root / name) for name in gate_split(root, manifest, split))
    return SplitSpec(root, split, tars, idxs, list(info.shard_sizes), info.num_samples, info.labeled,
                     manifest.num_classes, manifest.image_size, trusted)  # fmt: skip


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a loader needs, checked: the split, this rank's share of an epoch, the augmentation."""

    split: SplitSpec
    batch_size: int  # per rank; evaluation lowers it to the samples there are
    views: int
    preset: AugPreset  # resolved: evaluation uses 'eval' unless 'linear' is asked for
    image_size: int
    shard_id: int
    num_shards: int
    seed: int
    train: bool
    num_threads: int | None
    num_samples: int  # this rank's block of the split (evaluation reads exactly these)
    num_batches: int  # per epoch: training drops the last partial batch, evaluation keeps it
    shuffle: bool = True  # training order shuffled (check_shuffle); False: stored order, fresh views per epoch


def loader_spec(
    root: str | os.PathLike,
    split: str,
    *,
    batch_size: int,
    views: int,
    preset: str | AugPreset,
    shard_id: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    train: bool = True,
    image_size: int | None = None,
    num_threads: int | None = None,
    shuffle: bool | None = None,
) -> LoaderSpec:
    """Check the loader arguments against ``split`` of the dataset at ``root`` (read once)."""
    check_views(views)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(num_shards, int) and num_shards >= 1 and 0 <= shard_id < num_shards):
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    if num_threads is not None and num_threads < 0:
        raise ValueError(f"num_threads must be >= 0, got {num_threads}")
    shuffle = check_shuffle(shuffle, train)
    resolved = resolve_preset(preset, train)
    spec = read_split(root, split)
    size = resolve_image_size(image_size, spec.image_size, spec.root)
    total = spec.num_samples
    start, end = shard_bounds(total, shard_id, num_shards)
    # Training: every rank takes total // num_shards samples (ranks differ by at most one sample in
    # their block), so all take the same number of steps and no rank waits for a batch never made.
    available = total // num_shards if train else end - start
    if not train:
        # Evaluation reads every sample once in whatever batches fit: one short batch is fine.
        batch_size = min(batch_size, max(1, available))
    if batch_size > available:
        raise LoaderError(
            f"batch_size {batch_size} is larger than the {available} samples shard {shard_id}/{num_shards} "
            f"of split {split!r} ({total} samples in {spec.root}) provides; lower batch_size or num_shards"
        )
    batches = available // batch_size if train else math.ceil(available / batch_size)
    return LoaderSpec(spec, batch_size, views, resolved, size, shard_id, num_shards, int(seed), bool(train),
                      num_threads, end - start, batches, shuffle)  # fmt: skip


def check_shuffle(shuffle: bool | None, train: bool) -> bool:
    """Whether a loader shuffles: by default a training loader does. ``shuffle=False`` with ``train``
    reads the stored order with training augmentations, so every epoch's first batch holds the same
    images under fresh augmentations (the gradient-variance analysis draws views that way)."""
    if shuffle is None:
        return train
    if shuffle and not train:
        raise ValueError("shuffle=True needs train=True: evaluation reads every sample once, in stored order")
    return bool(shuffle)
