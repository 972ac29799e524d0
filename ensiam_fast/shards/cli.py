"""``tools/make_shards.py``'s command line: convert, adopt in place, or verify (``--verify DIR``).

The engines are ``convert.py`` (conversion), ``adopt.py`` (adoption) and ``verify.py`` (checks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ensiam_fast.command import command_name
from ensiam_fast.errors import UserError
from ensiam_fast.paths import DEFAULT_SHARDS
from ensiam_fast.shards.adopt import adopt
from ensiam_fast.shards.convert import convert, summary_line
from ensiam_fast.shards.encode import EncodeOptions
from ensiam_fast.shards.format import MANIFEST, MAX_CLASSES, MAX_PIXELS
from ensiam_fast.shards.manifest import read_manifest, write_manifest
from ensiam_fast.shards.sources import DATASETS, open_source
from ensiam_fast.shards.sources.webdataset import WebDatasetOptions, open_webdataset, parse_split_globs
from ensiam_fast.shards.verify import record_verdicts, verify_dataset


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=command_name("python tools/make_shards.py"),
        description="Convert a dataset to WebDataset shards with DALI indices, or verify converted shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=DATASETS, help="source layout to read")
    p.add_argument("--src", type=Path, help="source folder (not needed for digits)")
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default for digits: shards/digits; webdataset without --out: adopt --src in place)",
    )
    p.add_argument(
        "--split",
        action="append",
        metavar="NAME=GLOB",
        help="webdataset: the tars of split NAME (repeatable; default: tars named with train, val or test)",
    )
    p.add_argument("--classes", type=Path, metavar="FILE", help="webdataset: class names, one per line in label order")
    p.add_argument("--verify", type=Path, metavar="DIR", help="check a converted dataset and exit")
    p.add_argument(
        "--drop-corrupt",
        action="store_true",
        help="with --verify: rewrite shards without their corrupt samples (listed in the manifest's skipped)",
    )
    p.add_argument(
        "--drop-duplicates",
        action="store_true",
        help="webdataset: drop the later of two samples with the same key (one tar or two) and count it",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help="refuse images whose header claims more pixels (checked before decoding: decompression bombs)",
    )
    p.add_argument(
        "--max-classes", type=int, default=MAX_CLASSES, help="webdataset: refuse label sets making more classes"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="tars checked in parallel by --verify and adoption (default: --workers)",
    )
    p.add_argument("--shard-size", type=int, default=EncodeOptions.shard_size, help="samples per tar")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="png is lossless (small images)")
    p.add_argument("--quality", type=int, default=EncodeOptions.quality, help="JPEG quality 1..100")
    p.add_argument(
        "--resize",
        type=int,
        default=None,
        metavar="SIDE",
        help="scale images down so that the shorter side is SIDE (never up)",
    )
    p.add_argument(
        "--reencode",
        action="store_true",
        help="re-encode RGB JPEG sources too (by default their bytes are kept when not resized)",
    )
    p.add_argument(
        "--seed", type=int, default=EncodeOptions.seed, help="seed of the global order samples are written in"
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at an unreadable image instead of skipping it, and at a class folder without images",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a different conversion in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.verify is None and args.dataset is None:
        p.error("give --dataset NAME (with --src and --out) to convert, or --verify DIR to check")
    if args.dataset != "webdataset" and (args.split or args.classes or args.drop_duplicates):
        p.error("--split, --classes and --drop-duplicates are for --dataset webdataset")
    for name in ("max_pixels", "max_classes", "jobs", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    args.jobs = args.jobs or args.workers
    if args.verify is None and args.out is None and args.dataset != "webdataset":
        if args.dataset != "digits":
            p.error(f"--out is required for --dataset {args.dataset}")
        args.out = DEFAULT_SHARDS / "digits"  # where a relative data.root=shards/digits finds it (paths.py)
    if not 1 <= args.quality <= 100:
        p.error(f"--quality must be in 1..100, got {args.quality}")
    if args.shard_size < 1:
        p.error(f"--shard-size must be positive, got {args.shard_size}")
    if args.resize is not None and args.resize < 1:
        p.error(f"--resize must be positive, got {args.resize}")
    return args


def report_verify(report) -> int:
    """Print what a check found; the exit code (0: passed, 1: problems)."""
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    for split, (observed, expected) in report.mixing.items():
        print(f"split {split}: {observed:.1f} classes per shard on average (random order: {expected:.1f})")
    print(report.summary())
    return 0 if report.ok else 1


def record(root: Path, report, by: str, max_pixels: int) -> None:
    """Write each split's verdict into the manifest (a read-only dataset: say it could not)."""
    try:
        manifest = read_manifest(root)
        record_verdicts(root, manifest, report, by, max_pixels)
        write_manifest(root, manifest)
    except (OSError, UserError) as e:
        print(f"warning: the verdict could not be recorded in {root / MANIFEST} ({e})", file=sys.stderr)


def run_verify(root: Path, jobs: int, drop: bool = False, max_pixels: int = MAX_PIXELS, progress: bool = True) -> int:
    report = verify_dataset(root, workers=jobs, max_pixels=max_pixels, progress=progress)
    if drop and not report.ok:
        from ensiam_fast.shards.repair import drop_corrupt

        try:
            changes = drop_corrupt(root, report)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for line in changes:
            print(line)
        report = verify_dataset(root, workers=jobs, max_pixels=max_pixels, progress=progress)
    if report.split_problems:
        record(root, report, "verify", max_pixels)
    return report_verify(report)


def webdataset_options(args: argparse.Namespace) -> WebDatasetOptions:
    """How ``--dataset webdataset`` reads the tars of ``--src``, whether it adopts or rewrites them."""
    return WebDatasetOptions(
        split_globs=parse_split_globs(args.split),
        classes_file=args.classes,
        workers=args.jobs,
        max_classes=args.max_classes,
        drop_duplicates=args.drop_duplicates,
    )


def run_adopt(args: argparse.Namespace) -> int:
    """``--dataset webdataset`` without ``--out``: index the tars in place, check them, and write the
    manifest with its verdict (a failed check is recorded, so nothing trains on it)."""
    try:
        manifest, notes, report = adopt(
            args.src, webdataset_options(args), max_pixels=args.max_pixels, progress=not args.quiet
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    counts = ", ".join(f"{name} {s.num_samples} in {len(s.shards)} tar(s)" for name, s in manifest.splits.items())
    state = (
        "manifest and indices written" if report.ok else "the manifest records the failed check: nothing trains on it"
    )
    print(f"adopted {args.src} in place ({counts}, {manifest.num_classes} classes): {state}")
    return report_verify(report)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify is not None:
        return run_verify(args.verify, args.jobs, args.drop_corrupt, args.max_pixels, not args.quiet)
    if args.dataset == "webdataset" and args.out is None:
        return run_adopt(args)
    opts = EncodeOptions(args.format, args.quality, args.shard_size, args.resize, args.reencode, args.seed)
    started = time.perf_counter()
    try:
        if args.dataset == "webdataset":
            source = open_webdataset(args.src, webdataset_options(args))
        else:
            source = open_source(args.dataset, args.src, strict=args.strict)
        for note in source.notes:
            print(note if note.startswith("warning: ") else f"note: {note}", file=sys.stderr)
        manifest, worked = convert(
            source,
            args.out,
            opts,
            workers=args.workers,
            strict=args.strict,
            overwrite=args.overwrite,
            progress=not args.quiet,
            max_pixels=args.max_pixels,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    total = sum(s.num_samples for s in manifest.splits.values())
    if worked:
        print(f"converted {total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} images/s)")
    else:
        print(f"{args.out} is already complete (manifest, plan and all shards present); nothing to do")
    print(summary_line(manifest, args.out))
    return 0


if __name__ == "__main__":  # python -m ensiam_fast.shards.cli (tools/make_shards.py is the documented form)
    sys.exit(main())
