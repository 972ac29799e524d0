"""Convert a source dataset into shards (the engine behind ``tools/make_shards.py``, whose command line is ``cli.py``).

The work is planned up front (``ensiam_fast.shards.plan``): every split is cut into shards of
``shard_size`` consecutive positions of a seeded global order, and the plan (with the source
fingerprint and the encoding options) is saved in the output folder. Worker processes each read,
encode (``ensiam_fast.shards.encode``) and write whole shards (``write_shard`` is atomic), and the
main process appends one line per finished shard to a progress file. Running the same command again
therefore resumes: finished shards are kept, ``.tmp`` leftovers are removed, and ``manifest.json``
is written last.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ensiam_fast.rundir import open_append
from ensiam_fast.shards.encode import EncodeOptions, encode_sample
from ensiam_fast.shards.format import MANIFEST, MAX_PIXELS, describe_image_error, shard_name, write_shard
from ensiam_fast.shards.manifest import Manifest, SplitInfo, read_manifest, write_manifest
from ensiam_fast.shards.plan import PROGRESS, ConversionError, make_plan, prepare_output, split_order
from ensiam_fast.shards.sources import Sample, Source
from ensiam_fast.shards.verdict import make_verdict


@dataclass
class ShardTask:
    split: str
    shard: int
    start: int
    end: int


_WORKER: dict = {}


def _init_worker(source: Source, out: Path, opts: EncodeOptions, strict: bool, max_pixels: int = MAX_PIXELS) -> None:
    _WORKER.update(source=source, out=out, opts=opts, strict=strict, max_pixels=max_pixels)


def _encoded_samples(
    samples: Iterator[Sample], split: str, opts: EncodeOptions, strict: bool, skipped: list, sizes: set
) -> Iterator[tuple[str, dict[str, bytes]]]:
    for sample in samples:
        try:
            ext, data, hw = encode_sample(sample, opts, _WORKER.get("max_pixels", MAX_PIXELS))
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for a broken file
            reason = describe_image_error(e)
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
    tasks: list[ShardTask], source: Source, out: Path, opts: EncodeOptions, strict: bool, workers: int, max_pixels: int
) -> Iterator[dict]:
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(source, out, opts, strict, max_pixels)
        for task in tasks:
            yield convert_shard(task)
        return
    # fork shares the source arrays with the workers without pickling them.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    with ctx.Pool(
        min(workers, len(tasks)), initializer=_init_worker, initargs=(source, out, opts, strict, max_pixels)
    ) as pool:
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
    max_pixels: int = MAX_PIXELS,
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
        open_append(out / PROGRESS) as log,
        tqdm(total=total, unit="img", disable=not progress, desc=source.dataset) as bar,
    ):
        for rec in _run_tasks(tasks, source, out, opts, strict, workers, max_pixels):
            log.write(json.dumps(rec) + "\n")
            log.flush()
            done[(rec["split"], rec["shard"])] = rec
            bar.update(rec["planned"])
            for s in rec["skipped"]:
                tqdm.write(f"warning: skipped {s['source']}: {s['reason']}", file=sys.stderr)
    manifest = build_manifest(source, plan, done, opts)
    for info in manifest.splits.values():  # every image written was decoded (or kept, checked) here
        info.check = make_verdict(out, info, "conversion", [], max_pixels, manifest.num_classes)
    write_manifest(out, manifest)
    return manifest, True
