"""Convert a source dataset into shards (the engine behind ``tools/make_shards.py``), and its command line.

The work is planned up front (``ensiam_fast.shards.plan``): every split is cut into shards of
``shard_size`` consecutive positions of a seeded global order, and the plan (with the source
fingerprint and the encoding options) is saved in the output folder. Worker processes each read,
encode (``ensiam_fast.shards.encode``) and write whole shards (``write_shard`` is atomic), and the
main process appends one line per finished shard to a progress file. Running the same command again
therefore resumes: finished shards are kept, ``.tmp`` leftovers are removed, and ``manifest.json``
is written last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ensiam_fast.command import command_name
from ensiam_fast.errors import UserError
from ensiam_fast.paths import DEFAULT_SHARDS
from ensiam_fast.shards.adopt import adopt
from ensiam_fast.shards.encode import EncodeOptions, encode_sample
from ensiam_fast.shards.format import MANIFEST, shard_name, write_shard
from ensiam_fast.shards.manifest import Manifest, SplitInfo, read_manifest, write_manifest
from ensiam_fast.shards.plan import PROGRESS, ConversionError, make_plan, prepare_output, split_order
from ensiam_fast.shards.sources import DATASETS, Sample, Source, open_source
from ensiam_fast.shards.sources.webdataset import open_webdataset, parse_split_globs
from ensiam_fast.shards.verify import verify_dataset


@dataclass
class ShardTask:
    split: str
    shard: int
    start: int
    end: int


_WORKER: dict = {}


def _init_worker(source: Source, out: Path, opts: EncodeOptions, strict: bool) -> None:
    _WORKER.update(source=source, out=out, opts=opts, strict=strict)


def _encoded_samples(
    samples: Iterator[Sample], split: str, opts: EncodeOptions, strict: bool, skipped: list, sizes: set
) -> Iterator[tuple[str, dict[str, bytes]]]:
    for sample in samples:
        try:
            ext, data, hw = encode_sample(sample, opts)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for a broken file
            reason = f"{type(e).__name__}: {e}"
            if strict:
                raise ConversionError(f"cannot read {sample.source}: {reason} (--strict)") from None
            skipped.append({"source": sample.source, "reason": reason})
            continue
        sizes.add(hw)
        parts = {ext: data}
        if sample.label is not None:
            parts["cls"] = str(sample.label).encode("ascii")
        yield f"{split}_{sample.index:08d}", parts


def convert_shard(task: ShardTask) -> dict:
    """Read, encode and write one shard; return its progress record."""
    source, out, opts = _WORKER["source"], _WORKER["out"], _WORKER["opts"]
    reader = source.splits[task.split]
    skipped: list[dict] = []
    sizes: set[tuple[int, int]] = set()
    stream = _encoded_samples(
        reader.read(split_order(task.split, len(reader), opts.seed)[task.start : task.end]),
        task.split,
        opts,
        _WORKER["strict"],
        skipped,
        sizes,
    )
    first = next(stream, None)
    record = {"split": task.split, "shard": task.shard, "name": None, "num_samples": 0}
    if first is not None:
        rec = write_shard(out / shard_name(task.split, task.shard), itertools.chain([first], stream))
        record.update(name=rec.name, num_samples=rec.num_samples)
    record.update(skipped=skipped, sizes=sorted(sizes), planned=task.end - task.start)
    return record


# --------------------------------------------------------------------------- running


def _run_tasks(
    tasks: list[ShardTask], source: Source, out: Path, opts: EncodeOptions, strict: bool, workers: int
) -> Iterator[dict]:
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(source, out, opts, strict)
        for task in tasks:
            yield convert_shard(task)
        return
    # fork shares the source arrays with the workers without pickling them.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(source, out, opts, strict)) as pool:
        yield from pool.imap_unordered(convert_shard, tasks)
        pool.close()  # let the workers exit on their own (and be reaped) rather than be terminated
        pool.join()


def build_manifest(source: Source, plan: dict, records: dict[tuple[str, int], dict], opts: EncodeOptions) -> Manifest:
    splits = {}
    sizes = set()
    for name, sp in plan["splits"].items():
        recs = [records[(name, i)] for i in range(len(sp["bounds"]))]
        named = [r for r in recs if r["name"] is not None]
        splits[name] = SplitInfo(
            num_samples=sum(r["num_samples"] for r in recs),
            shards=[r["name"] for r in named],
            labeled=sp["labeled"],
            shard_sizes=[r["num_samples"] for r in named],
            skipped=[s for r in recs for s in r["skipped"]],
        )
        sizes.update(tuple(hw) for r in recs for hw in r["sizes"])
    extra = dict(source.extra)
    extra["encoding"] = {
        "format": opts.format,
        "quality": opts.quality if opts.format == "jpg" else None,
        "resize": opts.resize,
    }
    return Manifest(
        source.dataset,
        list(source.classes),
        splits,
        image_size=list(sizes.pop()) if len(sizes) == 1 else None,
        extra=extra,
        shuffle_seed=opts.seed,
    )


def summary_line(m: Manifest, out: Path) -> str:
    counts = ", ".join(f"{name} {s.num_samples}" for name, s in m.splits.items())
    skipped = sum(len(s.skipped) for s in m.splits.values())
    size = "x".join(map(str, m.image_size)) if m.image_size else "mixed sizes"
    return (
        f"{m.dataset}: {counts} ({m.num_classes} classes, {size}, "
        f"{m.extra.get('encoding', {}).get('format', '?')}, {skipped} skipped) -> {out}"
    )


def convert(
    source: Source,
    out: Path,
    opts: EncodeOptions,
    *,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Manifest, bool]:
    """Convert ``source`` into ``out``; return the manifest and whether anything had to be done."""
    out = Path(out)
    plan = make_plan(source, opts)
    done = prepare_output(out, plan, overwrite)
    tasks = [
        ShardTask(name, i, s, e)
        for name, sp in plan["splits"].items()
        for i, (s, e) in enumerate(sp["bounds"])
        if (name, i) not in done
    ]
    if not tasks and (out / MANIFEST).is_file():
        return read_manifest(out), False
    from tqdm import tqdm

    total = sum(t.end - t.start for t in tasks)
    with (
        open(out / PROGRESS, "a") as log,
        tqdm(total=total, unit="img", disable=not progress, desc=source.dataset) as bar,
    ):
        for rec in _run_tasks(tasks, source, out, opts, strict, workers):
            log.write(json.dumps(rec) + "\n")
            log.flush()
            done[(rec["split"], rec["shard"])] = rec
            bar.update(rec["planned"])
            for s in rec["skipped"]:
                tqdm.write(f"warning: skipped {s['source']}: {s['reason']}", file=sys.stderr)
    manifest = build_manifest(source, plan, done, opts)
    write_manifest(out, manifest)
    return manifest, True


# --------------------------------------------------------------------------- command line


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
    p.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace a different conversion in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.verify is None and args.dataset is None:
        p.error("give --dataset NAME (with --src and --out) to convert, or --verify DIR to check")
    if args.dataset != "webdataset" and (args.split or args.classes):
        p.error("--split and --classes are for --dataset webdataset")
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


def run_verify(root: Path, workers: int, drop: bool = False) -> int:
    report = verify_dataset(root, workers=workers)
    if drop and not report.ok:
        from ensiam_fast.shards.repair import drop_corrupt

        try:
            changes = drop_corrupt(root, report)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for line in changes:
            print(line)
        report = verify_dataset(root, workers=workers)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    for split, (observed, expected) in report.mixing.items():
        print(f"split {split}: {observed:.1f} classes per shard on average (random order: {expected:.1f})")
    print(report.summary())
    return 0 if report.ok else 1


def run_adopt(args: argparse.Namespace) -> int:
    """``--dataset webdataset`` without ``--out``: index the tars in place, then verify them."""
    try:
        manifest, notes = adopt(args.src, parse_split_globs(args.split), args.classes, args.workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    counts = ", ".join(f"{name} {s.num_samples} in {len(s.shards)} tar(s)" for name, s in manifest.splits.items())
    print(f"adopted {args.src} in place ({counts}, {manifest.num_classes} classes): manifest and indices written")
    return run_verify(args.src, args.workers)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify is not None:
        return run_verify(args.verify, args.workers, args.drop_corrupt)
    if args.dataset == "webdataset" and args.out is None:
        return run_adopt(args)
    opts = EncodeOptions(args.format, args.quality, args.shard_size, args.resize, args.reencode, args.seed)
    started = time.perf_counter()
    try:
        if args.dataset == "webdataset":
            source = open_webdataset(args.src, parse_split_globs(args.split), args.classes, args.workers)
        else:
            source = open_source(args.dataset, args.src)
        for note in source.notes:
            print(f"note: {note}", file=sys.stderr)
        manifest, worked = convert(
            source,
            args.out,
            opts,
            workers=args.workers,
            strict=args.strict,
            overwrite=args.overwrite,
            progress=not args.quiet,
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


if __name__ == "__main__":  # python -m ensiam_fast.shards.convert (tools/make_shards.py is the documented form)
    sys.exit(main())
