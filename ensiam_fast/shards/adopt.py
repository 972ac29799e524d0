"""Adopting existing WebDataset shards in place: ``make_shards.py --dataset webdataset --src DIR``.

Writes ``manifest.json`` and a DALI index beside every tar and copies nothing, so an ImageNet-sized
dataset is never duplicated; the tars are only read. Splits, labels and classes come from
``sources/webdataset.py``. The command then verifies the dataset (every image decoded, classes per
shard against a random order), because foreign shards are often class-sorted: the fix is
``--out NEW``, which rewrites them into new shards in a seeded random order.
"""

from __future__ import annotations

from pathlib import Path

from ensiam_fast.shards.format import MANIFEST, ShardFormatError, index_name, write_atomic
from ensiam_fast.shards.index import format_index
from ensiam_fast.shards.manifest import Manifest, SplitInfo, read_manifest, write_manifest
from ensiam_fast.shards.sources.webdataset import scan_webdataset

ADOPTED = "adopted_from"  # the manifest's extra key that marks an adopted dataset


def adopt(
    src: Path, split_globs: dict[str, str] | None = None, classes_file: Path | None = None, workers: int = 1
) -> tuple[Manifest, list[str]]:
    """Index the tars of ``src`` and write its manifest; return it and the notes to show."""
    root = Path(src)
    if (root / MANIFEST).is_file():
        try:
            adopted_before = ADOPTED in read_manifest(root).extra
        except ShardFormatError:
            adopted_before = False
        if not adopted_before:
            raise ShardFormatError(
                f"{root / MANIFEST} exists and was not written by an adoption: {root} is already a dataset "
                f"(check it with `python tools/make_shards.py --verify {root}`); to adopt its tars anew, "
                "remove that manifest first"
            )
    scan = scan_webdataset(root, split_globs, classes_file, workers)
    notes = list(scan.notes)
    splits = {}
    sizes: set[tuple[int, int]] = set()
    for split, tars in scan.splits.items():
        named = [t for t in tars if t.samples]
        if len(named) < len(tars):
            notes.append(f"split {split!r}: {len(tars) - len(named)} tar(s) hold no samples and are left out")
        for t in named:
            write_atomic(root / index_name(t.name), format_index(t.samples))  # never through a link
            sizes |= t.sizes
        splits[split] = SplitInfo(
            num_samples=sum(len(t.samples) for t in named),
            shards=[t.name for t in named],
            labeled=scan.labeled(split),
            shard_sizes=[len(t.samples) for t in named],
        )
    manifest = Manifest(
        root.resolve().name,
        scan.classes,
        splits,
        image_size=list(sizes.pop()) if len(sizes) == 1 else None,
        extra={ADOPTED: {"format": "webdataset", "splits": split_globs or "names"}},
        shuffle_seed=None,  # the order is the tars' own
    )
    write_manifest(root, manifest)
    return manifest, notes
