"""``make_shards.py --verify DIR --drop-corrupt``: rewrite the shards that hold bad samples without them."""

from __future__ import annotations

from pathlib import Path

from ensiam_fast.shards.format import MANIFEST, ShardFormatError, index_name, write_shard
from ensiam_fast.shards.index import read_index, split_member
from ensiam_fast.shards.manifest import read_manifest, resolve_inside, write_manifest
from ensiam_fast.shards.verify import ShardCheck, VerifyReport


def _repairable(check: ShardCheck | None) -> bool:
    """Bad samples and nothing else (a truncated tar or a wrong index needs re-making instead)."""
    if check is None or not check.bad_samples:
        return False
    return len(check.problems) == sum(len(found) for found in check.bad_samples.values())


def _kept_samples(tar: Path, bad: dict[str, list[str]]) -> list[tuple[str, dict[str, bytes]]]:
    samples = []
    with open(tar, "rb") as f:
        for entry in read_index(tar.with_name(index_name(tar.name))):
            key = split_member(entry[0].member)[0]
            if key in bad:
                continue
            parts = {}
            for m in entry:
                f.seek(m.offset)
                parts[m.ext] = f.read(m.size)
            samples.append((key, parts))
    return samples


def drop_corrupt(root: Path, report: VerifyReport) -> list[str]:
    """Rewrite every shard whose only problems are bad samples (an image that does not decode, a
    bad label) without them, then the manifest; returns one line per change.

    Each shard is rewritten atomically (``write_shard``) and the manifest last, listing the dropped
    samples in its split's ``skipped``. A shard left with no sample leaves the manifest, and its
    files are removed after the manifest is written.
    """
    root = Path(root)
    manifest = read_manifest(root)
    changes: list[str] = []
    emptied: list[Path] = []
    for split, info in manifest.splits.items():  # refused before any shard is rewritten, not half-way
        kept = 0
        for i, name in enumerate(info.shards):
            check = report.checks.get(name)
            if _repairable(check):
                kept += check.num_samples - len(check.bad_samples)
            else:
                kept += info.shard_sizes[i] if i < len(info.shard_sizes) else check.num_samples if check else 0
        if kept < 1:
            raise ShardFormatError(
                f"split {split!r} of {root} would be empty after dropping its corrupt samples (nothing was "
                "changed): every sample of it is bad; re-make the dataset with tools/make_shards.py"
            )
    for split, info in manifest.splits.items():
        names, sizes = [], []
        for i, name in enumerate(info.shards):
            check = report.checks.get(name)
            size = info.shard_sizes[i] if i < len(info.shard_sizes) else check.num_samples if check else 0
            if not _repairable(check):
                names.append(name)
                sizes.append(size)
                continue
            tar = resolve_inside(root, name)
            samples = _kept_samples(tar, check.bad_samples)
            for key, found in check.bad_samples.items():
                reason = "; ".join(found)
                changes.append(f"dropped sample {key!r} of {name}: {reason}")
                info.skipped.append({"source": f"{name}#{key}", "reason": f"dropped by --drop-corrupt: {reason}"})
            if samples:
                names.append(name)
                sizes.append(write_shard(tar, samples).num_samples)
            else:
                changes.append(f"{name} has no sample left: removed from {MANIFEST}")
                emptied.append(tar)
        if sum(sizes) < 1:
            raise ShardFormatError(f"split {split!r} of {root} would be empty after dropping its corrupt samples")
        info.shards, info.shard_sizes, info.num_samples = names, sizes, sum(sizes)
    write_manifest(root, manifest)
    for tar in emptied:
        tar.with_name(index_name(tar.name)).unlink(missing_ok=True)
        tar.unlink(missing_ok=True)
    return changes
