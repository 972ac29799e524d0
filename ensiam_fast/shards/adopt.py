"""Adopting existing WebDataset shards in place: ``make_shards.py --dataset webdataset --src DIR``.

Writes ``manifest.json`` and a DALI index beside every tar and copies nothing, so an ImageNet-sized
dataset is never duplicated; the tars are only read. Splits, labels and classes come from
``sources/webdataset.py``. Every sample is checked before the manifest is written (header, decode,
label), and the manifest records the result (``verdict.py``): a failed adoption is refused by every
loader. The check also compares classes per shard with a random order, because foreign shards are
often class-sorted: the fix is ``--out NEW``, which rewrites them in a seeded random order.
"""

from __future__ import annotations

from pathlib import Path

from ensiam_fast.shards.format import MANIFEST, MAX_PIXELS, ShardFormatError, index_name, write_atomic
from ensiam_fast.shards.index import format_index
from ensiam_fast.shards.manifest import Manifest, SplitInfo, read_manifest, write_manifest
from ensiam_fast.shards.sources.webdataset import WebDatasetOptions, scan_webdataset
from ensiam_fast.shards.verify import DUPLICATE, VerifyReport, record_verdicts, verify_dataset

ADOPTED = "adopted_from"  # the manifest's extra key that marks an adopted dataset


def adopt(
    src: Path, options: WebDatasetOptions, *, max_pixels: int = MAX_PIXELS, progress: bool = False
) -> tuple[Manifest, list[str], VerifyReport]:
    """Index the tars of ``src``, check them, and write the manifest with each split's verdict;
    return it, the notes to show and the check's report.

    A problem in the layout or the labels raises before anything is written. Then the indices are
    written, every sample checked (``verify_dataset``), and the manifest written last, recording the
    result: a failed check is in it, so the loaders refuse the split until it is fixed. An interrupted
    adoption removes the indices it created (a folder without a manifest is no dataset)."""
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
    scan = scan_webdataset(root, options, progress=progress)
    notes = list(scan.notes)
    splits = {}
    sizes: set[tuple[int, int]] = set()
    written: list[Path] = []
    try:
        for split, tars in scan.splits.items():
            named = [t for t in tars if t.samples]
            if len(named) < len(tars):
                notes.append(f"split {split!r}: {len(tars) - len(named)} tar(s) hold no samples and are left out")
            for t in named:
                idx = root / index_name(t.name)
                if not idx.exists():
                    written.append(idx)
                write_atomic(idx, format_index(t.samples))  # never through a link
                sizes |= t.sizes
            splits[split] = SplitInfo(
                num_samples=sum(len(t.samples) for t in named),
                shards=[t.name for t in named],
                labeled=scan.labeled(split),
                shard_sizes=[len(t.samples) for t in named],
                skipped=[
                    {"source": f"{t.name}#{key}", "reason": f"{DUPLICATE}: {where} (--drop-duplicates)"}
                    for t in tars
                    for key, where in t.dropped
                ],
            )
        manifest = Manifest(
            root.resolve().name,
            scan.classes,
            splits,
            image_size=list(sizes.pop()) if len(sizes) == 1 else None,
            extra={ADOPTED: {"format": "webdataset", "splits": options.split_globs or "names"}},
            shuffle_seed=None,  # the order is the tars' own
        )
        report = verify_dataset(
            root, workers=options.workers, max_pixels=max_pixels, progress=progress, manifest=manifest
        )
        record_verdicts(root, manifest, report, "adoption", max_pixels)
        write_manifest(root, manifest)
    except BaseException:
        for idx in written:
            idx.unlink(missing_ok=True)
        raise
    return manifest, notes, report
