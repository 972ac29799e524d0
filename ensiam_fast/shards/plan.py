"""The conversion plan and the output folder: what to write, what is already written, resuming.

The plan (source fingerprint, encoding options, per split the shard bounds over the seeded global
order) is saved in the output folder; a progress file gets one line per finished shard. Running the
same conversion again compares plans and keeps the shards already finished.
"""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ensiam_fast.errors import UserError
from ensiam_fast.shards.encode import EncodeOptions
from ensiam_fast.shards.format import MANIFEST, TMP_SUFFIX, ShardFormatError, index_name, write_atomic
from ensiam_fast.shards.index import index_count
from ensiam_fast.shards.sources import Source

PLAN = ".make_shards_plan.json"
PROGRESS = ".make_shards_done.jsonl"
PLAN_VERSION = 2  # 2: samples in a seeded global order (1: source order)


class ConversionError(UserError):
    """A conversion that cannot go on (a bad image under --strict, a refused output folder)."""


@functools.lru_cache(maxsize=8)
def split_order(split: str, count: int, seed: int) -> np.ndarray:
    """The order a split's source indices are written in: a permutation seeded with (seed, split).

    Shard i holds positions [i * shard_size, (i + 1) * shard_size) of it, so every shard is a
    uniform random draw of the split (every class mixed in) whatever order the source lists its
    images in (Tiny-ImageNet, ImageFolder and most others list them class by class).
    """
    return np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(count)


def make_plan(source: Source, opts: EncodeOptions) -> dict:
    splits = {}
    for name, reader in source.splits.items():
        n = len(reader)
        bounds = [[s, min(n, s + opts.shard_size)] for s in range(0, n, opts.shard_size)]
        splits[name] = {"labeled": reader.labeled, "count": n, "bounds": bounds}
    return {
        "version": PLAN_VERSION,
        "dataset": source.dataset,
        "fingerprint": source.fingerprint,
        "options": asdict(opts),
        "splits": splits,
    }


def _ours(path: Path) -> bool:
    return path.name in (MANIFEST, PLAN, PROGRESS) or path.suffix in (".tar", ".idx", TMP_SUFFIX)


def _clear(out: Path) -> None:
    for p in out.iterdir():
        if p.is_file() and _ours(p):
            p.unlink()


def _describe_difference(old: dict, new: dict) -> str:
    if old.get("dataset") != new["dataset"]:
        return f"it holds the dataset {old.get('dataset')!r}, not {new['dataset']!r}"
    if old.get("fingerprint") != new["fingerprint"]:
        return "it was converted from different source files"
    changed = [k for k in new["options"] if old.get("options", {}).get(k) != new["options"][k]]
    if changed:
        return (
            "it was converted with other options ("
            + ", ".join(f"{k}={old.get('options', {}).get(k)!r}" for k in changed)
            + ")"
        )
    return "its plan differs from this run's"


def prepare_output(out: Path, plan: dict, overwrite: bool) -> dict[tuple[str, int], dict]:
    """Make ``out`` ready for ``plan``; return the records of shards already finished there."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} exists and is not a folder")
    if overwrite and out.is_dir():
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / PLAN
    if overwrite or not any(out.iterdir()):
        write_atomic(plan_file, json.dumps(plan) + "\n")
        return {}
    if not plan_file.is_file():
        what = "a dataset written by another tool" if (out / MANIFEST).exists() else "other files"
        raise ConversionError(
            f"--out {out} is not empty and holds {what}; choose an empty folder or pass --overwrite "
            "(which deletes its .tar, .idx, .tmp and manifest files)"
        )
    try:
        old = json.loads(plan_file.read_text())
    except json.JSONDecodeError:
        old = {"dataset": f"(unreadable {PLAN})"}
    if old != plan:
        raise ConversionError(
            f"--out {out} already holds another conversion: {_describe_difference(old, plan)}; "
            "choose another --out or pass --overwrite to replace it"
        )
    for p in out.glob("*" + TMP_SUFFIX):
        p.unlink()  # leftovers of an interrupted run
    return _finished_shards(out, plan)


def _finished_shards(out: Path, plan: dict) -> dict[tuple[str, int], dict]:
    """Progress records whose shard is on disk and whose index agrees with the record."""
    progress = out / PROGRESS
    done = {}
    if not progress.is_file():
        return done
    for line in progress.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
        split_plan = plan["splits"].get(rec.get("split"))
        if split_plan is None or not 0 <= rec["shard"] < len(split_plan["bounds"]):
            continue
        if rec["name"] is not None and not _shard_on_disk(out / rec["name"], rec["num_samples"]):
            continue
        done[(rec["split"], rec["shard"])] = rec
    return done


def _shard_on_disk(tar: Path, num_samples: int) -> bool:
    idx = tar.with_name(index_name(tar.name))
    if not (tar.is_file() and idx.is_file()):
        return False
    try:
        return index_count(idx) == num_samples
    except ShardFormatError:
        return False
