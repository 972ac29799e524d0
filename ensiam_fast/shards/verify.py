"""Checking converted shards: every tar complete, its index matching it, its images decoding."""

from __future__ import annotations

import io
import math
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from ensiam_fast.shards.format import IMAGE_EXTS, MANIFEST, TAR_BLOCK, TMP_SUFFIX, ShardFormatError, index_name
from ensiam_fast.shards.index import read_index, split_member
from ensiam_fast.shards.manifest import read_manifest, resolve_inside

# Pillow modes both loaders decode to RGB (DALI's decoder on CPU, torchvision's with ImageReadMode.RGB);
# our conversions write RGB only, adopted WebDataset shards may hold the others (tests/test_adopt.py).
DECODED_MODES = ("RGB", "L", "CMYK", "P", "RGBA")


@dataclass
class ShardCheck:
    """The outcome of checking one tar and its index."""

    name: str
    num_samples: int = 0
    problems: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # the valid labels it holds (labelled splits)
    bad_samples: dict[str, list[str]] = field(default_factory=dict)  # key -> what is wrong with it


def _tar_members(tar: Path, size: int, problems: list[str]) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member, in order; truncation becomes a problem."""
    members = []
    try:
        with tarfile.open(tar, mode="r:") as tf:
            while (m := tf.next()) is not None:
                if not m.isfile():
                    problems.append(f"{tar.name}: member {m.name!r} is not a regular file")
                    continue
                if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in m.name):
                    problems.append(f"{tar.name}: member name {m.name!r} has a control character or a space")
                    continue
                members.append((m.name, m.offset_data, m.size))
    except (tarfile.TarError, EOFError, OSError) as e:
        problems.append(f"{tar.name}: truncated or corrupt tar ({e})")
        return members
    end = members[-1][1] + -(-members[-1][2] // TAR_BLOCK) * TAR_BLOCK if members else 0
    with open(tar, "rb") as f:
        f.seek(end)
        trailer = f.read(2 * TAR_BLOCK)
    if end > size or len(trailer) < 2 * TAR_BLOCK or trailer.strip(b"\0"):
        problems.append(f"{tar.name}: no end-of-archive marker after the last member (truncated tar)")
    return members


def _index_entries(idx: Path, problems: list[str]) -> list[list[tuple[str, int, int, str]]] | None:
    """One list of (ext, offset, size, member) per sample line, or None when unreadable."""
    try:
        return [[(m.ext, m.offset, m.size, m.member) for m in sample] for sample in read_index(idx)]
    except ShardFormatError as e:
        problems.append(str(e))
        return None


def _check_sample(
    name: str, key: str, parts: dict[str, bytes], labeled: bool, num_classes: int, decode: bool
) -> list[str]:
    from PIL import Image

    problems = []
    images = [e for e in parts if e in IMAGE_EXTS]
    if len(images) != 1:
        wanted = ", ".join("." + e for e in IMAGE_EXTS)
        return [f"{name}: sample {key!r} should have one image ({wanted}), has {sorted(parts)}"]
    if labeled:
        cls = parts.get("cls")
        text = cls.decode("ascii", "replace").strip() if cls is not None else None
        if text is None or not text.isdigit() or int(text) >= num_classes:
            problems.append(f"{name}: sample {key!r} has label {text!r}, expected an integer in 0..{num_classes - 1}")
    elif "cls" in parts:
        problems.append(f"{name}: sample {key!r} has a .cls but its split is unlabelled")
    if decode:
        try:
            with Image.open(io.BytesIO(parts[images[0]])) as img:
                img.load()
                if img.mode not in DECODED_MODES:
                    problems.append(
                        f"{name}: sample {key!r} image is {img.mode}, not one of the 8-bit modes the loaders "
                        f"read as RGB ({', '.join(DECODED_MODES)})"
                    )
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for a broken image
            problems.append(f"{name}: sample {key!r} image does not decode ({type(e).__name__}: {e})")
    return problems


def check_shard(tar: Path, labeled: bool, num_classes: int, decode: bool = True) -> ShardCheck:
    """Check that a tar is complete, its index matches it member for member, and its images decode."""
    tar = Path(tar)
    idx = tar.with_name(index_name(tar.name))
    check = ShardCheck(tar.name)
    for path in (tar, idx):
        if not path.is_file():
            check.problems.append(f"{path.name} is missing")
    if check.problems:
        return check
    size = tar.stat().st_size
    members = _tar_members(tar, size, check.problems)
    by_name = {name: (off, sz) for name, off, sz in members}
    entries = _index_entries(idx, check.problems)
    if entries is None:
        return check
    listed = set()
    for line in entries:
        for ext, off, sz, member in line:
            listed.add(member)
            if not member.endswith("." + ext):
                check.problems.append(f"{idx.name}: entry {member!r} does not end with its extension {ext!r}")
            elif member not in by_name:
                check.problems.append(f"{idx.name}: {member!r} is not in {tar.name}")
            elif by_name[member] != (off, sz):
                check.problems.append(
                    f"{idx.name}: {member!r} at offset {off} size {sz}, but {tar.name} has it at "
                    f"offset {by_name[member][0]} size {by_name[member][1]}"
                )
    unlisted = [name for name in by_name if name not in listed]
    if unlisted:
        check.problems.append(f"{idx.name} does not list {len(unlisted)} member(s) of {tar.name}, e.g. {unlisted[0]!r}")
    samples: dict[str, dict[str, bytes]] = {}
    with open(tar, "rb") as f:
        for name, off, sz in members:
            key, ext = split_member(name)
            f.seek(off)
            samples.setdefault(key, {})[ext] = f.read(sz)
    for key, parts in samples.items():
        found = _check_sample(tar.name, key, parts, labeled, num_classes, decode)
        if found:
            check.problems.extend(found)
            check.bad_samples[key] = found
        text = parts.get("cls", b"").decode("ascii", "replace").strip()
        if labeled and text.isdigit() and int(text) < num_classes:
            check.labels.append(int(text))
    check.num_samples = len(samples)
    if len(entries) != len(samples):
        check.problems.append(f"{idx.name} lists {len(entries)} samples but {tar.name} holds {len(samples)}")
    return check


def _check_shard_args(args: tuple) -> ShardCheck:
    return check_shard(*args)


def expected_classes(class_counts: list[int], draws: int) -> float:
    """Distinct classes expected among ``draws`` samples drawn at random without replacement from a
    split with ``class_counts`` samples per class: sum over classes of 1 - C(N - c, n) / C(N, n)."""
    total = sum(class_counts)
    if draws >= total:
        return float(sum(1 for c in class_counts if c))

    def log_choose(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    base = log_choose(total, draws)
    return sum(
        1.0 - (math.exp(log_choose(total - c, draws) - base) if total - c >= draws else 0.0) for c in class_counts if c
    )


def class_mixing(shard_labels: list[list[int]]) -> tuple[float, float]:
    """(distinct classes per shard on average, the same under a random order of the split)."""
    counts: dict[int, int] = {}
    for labels in shard_labels:
        for y in labels:
            counts[y] = counts.get(y, 0) + 1
    per_class = list(counts.values())
    shards = [labels for labels in shard_labels if labels]
    observed = sum(len(set(labels)) for labels in shards) / len(shards)
    expected = sum(expected_classes(per_class, len(labels)) for labels in shards) / len(shards)
    return observed, expected


# Shards holding fewer than this fraction of the classes a random order gives are called class-sorted.
SORTED_FRACTION = 0.6


@dataclass
class VerifyReport:
    """What ``verify_dataset`` found: samples per split, problems (fatal) and warnings."""

    root: Path
    dataset: str | None = None
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (samples, shards)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checks: dict[str, ShardCheck] = field(default_factory=dict)  # shard name -> its check
    # split -> (distinct classes per shard on average, what a random order gives on average)
    mixing: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        splits = ", ".join(f"{s} {n} samples in {k} shard{'s' * (k != 1)}" for s, (n, k) in self.counts.items())
        verdict = "OK" if self.ok else f"FAILED with {len(self.problems)} problem(s)"
        return f"verify {self.root}: dataset {self.dataset}, {splits or 'no splits'}: {verdict}"


def verify_dataset(root: str | os.PathLike, workers: int = 1, decode: bool = True) -> VerifyReport:
    """Check every shard of a converted dataset against its index and the manifest."""
    root = Path(root)
    report = VerifyReport(root)
    try:
        manifest = read_manifest(root)
    except ShardFormatError as e:
        report.problems.append(str(e))
        return report
    report.dataset = manifest.dataset
    for info in manifest.splits.values():
        for name in info.shards:
            try:
                resolve_inside(root, name)
            except ShardFormatError as e:
                report.problems.append(str(e))
    if report.problems:
        return report
    jobs = [
        (root / name, info.labeled, manifest.num_classes, decode)
        for info in manifest.splits.values()
        for name in info.shards
    ]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        with ctx.Pool(min(workers, len(jobs))) as pool:
            checks = pool.map(_check_shard_args, jobs, chunksize=1)
    else:
        checks = [check_shard(*job) for job in jobs]
    results = iter(checks)
    for split, info in manifest.splits.items():
        found = 0
        shard_labels = []
        if info.shard_sizes and len(info.shard_sizes) != len(info.shards):
            report.problems.append(
                f"{MANIFEST}: split {split!r} has {len(info.shards)} shards but {len(info.shard_sizes)} shard_sizes"
            )
        for i, name in enumerate(info.shards):
            check = next(results)
            report.checks[name] = check
            report.problems.extend(check.problems)
            found += check.num_samples
            shard_labels.append(check.labels)
            expected = info.shard_sizes[i] if i < len(info.shard_sizes) else None
            if expected is not None and check.num_samples != expected and not check.problems:
                report.problems.append(f"{name} holds {check.num_samples} samples, {MANIFEST} says {expected}")
        if found != info.num_samples:
            report.problems.append(
                f"split {split!r}: {found} samples in its shards, {MANIFEST} says {info.num_samples}"
            )
        report.counts[split] = (found, len(info.shards))
        if info.labeled and any(shard_labels):
            observed, expected = report.mixing[split] = class_mixing(shard_labels)
            if observed < SORTED_FRACTION * expected:
                report.warnings.append(
                    f"split {split!r} looks class-sorted: its shards hold {observed:.1f} classes on average, "
                    f"a random order would give {expected:.1f}; batches will hold few classes. Re-make it "
                    "with tools/make_shards.py (which writes a seeded random order; for adopted WebDataset "
                    "shards: --dataset webdataset --src DIR --out NEW)"
                )
        if info.skipped:
            report.warnings.append(f"split {split!r}: {len(info.skipped)} source image(s) were skipped at conversion")
    listed = {name for info in manifest.splits.values() for name in info.shards}
    stray = sorted(p.name for p in root.glob("*.tar") if p.name not in listed)
    if stray:
        report.warnings.append(f"{len(stray)} tar file(s) not in {MANIFEST}, e.g. {stray[0]}")
    leftovers = sorted(p.name for p in root.glob("*" + TMP_SUFFIX))
    if leftovers:
        report.warnings.append(f"{len(leftovers)} unfinished .tmp file(s), e.g. {leftovers[0]}")
    return report
