"""Checking converted shards: every tar complete, its index matching it, its images decoding."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ensiam_fast.shards.format import (
    HEADER_BYTES,
    IMAGE_EXTS,
    LABEL_EXT,
    MANIFEST,
    MAX_IMAGE_BYTES,
    MAX_LABEL_BYTES,
    MAX_PIXELS,
    TMP_SUFFIX,
    ShardFormatError,
    image_dims,
    image_problem,
    index_name,
    label_problem,
    parse_label,
    pixel_problem,
)
from ensiam_fast.shards.index import NOT_ADJACENT, REORDER, IndexEntry, read_index, read_tar, split_member
from ensiam_fast.shards.manifest import Manifest, read_manifest, resolve_inside
from ensiam_fast.shards.verdict import make_verdict


@dataclass
class ShardCheck:
    """The outcome of checking one tar and its index."""

    name: str
    num_samples: int = 0
    problems: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # the valid labels it holds (labelled splits)
    bad_samples: dict[str, list[str]] = field(default_factory=dict)  # key -> what is wrong with it


def _compare_index(idx: Path, tar: Path, listed: list[list[IndexEntry]], found: list[list[IndexEntry]]) -> str | None:
    """The first difference between an index and what the tar holds, or None."""
    if len(listed) != len(found):
        return f"{idx.name} lists {len(listed)} samples but {tar.name} holds {len(found)}"
    for n, (a, b) in enumerate(zip(listed, found), 2):
        if a != b:
            return (
                f"{idx.name} line {n} lists (member, offset, size) {[(m.member, m.offset, m.size) for m in a]}, "
                f"but {tar.name} has {[(m.member, m.offset, m.size) for m in b]} there"
            )
    return None


def sample_problems(f, where: str, key: str, sample: list[IndexEntry], labeled: bool, num_classes: int,
                    decode: bool, max_pixels: int) -> list[str]:  # fmt: skip
    """What is wrong with one sample of the open tar ``f`` (its members as indexed); reads only its
    image (the header first: a bomb is refused before its data is read) and its label."""
    images = [m for m in sample if m.ext in IMAGE_EXTS]
    exts = sorted(m.ext for m in sample)
    if len(images) != 1:
        wanted = ", ".join("." + e for e in IMAGE_EXTS)
        return [f"{where}: sample {key!r} should have one image ({wanted}), has {exts}"]
    problems = []
    cls = [m for m in sample if m.ext == LABEL_EXT]
    if labeled:
        if not cls:
            problems.append(f"{where}: sample {key!r} has no .{LABEL_EXT} but its split is labelled")
        else:
            f.seek(cls[0].offset)
            if problem := label_problem(f.read(min(cls[0].size, MAX_LABEL_BYTES + 1)), num_classes):
                problems.append(f"{where}: sample {key!r}: {problem}")
    elif cls:
        problems.append(f"{where}: sample {key!r} has a .{LABEL_EXT} but its split is unlabelled")
    image = images[0]
    f.seek(image.offset)
    head = f.read(min(image.size, HEADER_BYTES))
    problem = pixel_problem(image_dims(head), max_pixels)
    if problem is None and image.size > MAX_IMAGE_BYTES:
        problem = f"the image member is {image.size:,} bytes, more than {MAX_IMAGE_BYTES:,}"
    if problem is None:
        problem = image_problem(head + f.read(image.size - len(head)), max_pixels, decode)
    if problem:
        problems.append(f"{where}: sample {key!r} ({image.member!r}): {problem}")
    return problems


def check_shard(
    tar: Path,
    labeled: bool,
    num_classes: int,
    decode: bool = True,
    max_pixels: int = MAX_PIXELS,
    dropped: frozenset[str] = frozenset(),
) -> ShardCheck:
    """Check that a tar is complete, its index lists exactly its samples, and every sample has one
    image within ``max_pixels`` that decodes and a label in range. The tar is read member by member
    (memory bounded by one image, whatever its size). ``dropped``: keys whose repetitions were left
    out on purpose (``--drop-duplicates``, listed in the manifest's ``skipped``)."""
    tar = Path(tar)
    idx = tar.with_name(index_name(tar.name))
    check = ShardCheck(tar.name)
    for path in (tar, idx):
        if not path.is_file():
            check.problems.append(f"{path.name} is missing")
    if check.problems:
        return check
    try:
        contents = read_tar(tar)
    except ShardFormatError as e:
        check.problems.append(str(e))
        return check
    check.problems.extend(contents.odd)
    across = dropped - {key for key, _ in contents.duplicates}  # repeated from another tar: none of it is indexed
    if across:
        contents.samples = [s for s in contents.samples if split_member(s[0].member)[0] not in across]
    for key, where in contents.duplicates:
        if key not in dropped:
            fix = REORDER if NOT_ADJACENT in where else "re-adopt with --drop-duplicates to drop the later one"
            check.problems.append(f"sample key {key!r} comes twice: {where}; {fix}")
    try:
        listed = read_index(idx)
    except ShardFormatError as e:
        check.problems.append(str(e))
        return check
    if mismatch := _compare_index(idx, tar, listed, contents.samples):
        check.problems.append(mismatch)
        return check
    with open(tar, "rb") as f:
        for sample in contents.samples:
            key = split_member(sample[0].member)[0]
            found = sample_problems(f, tar.name, key, sample, labeled, num_classes, decode, max_pixels)
            if found:
                check.problems.extend(found)
                check.bad_samples[key] = found
            elif labeled:
                cls = next(m for m in sample if m.ext == LABEL_EXT)
                f.seek(cls.offset)
                check.labels.append(parse_label(f.read(min(cls.size, MAX_LABEL_BYTES + 1))))
    check.num_samples = len(contents.samples)
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
    split_problems: dict[str, list[str]] = field(default_factory=dict)  # per split (what its verdict records)
    # split -> (distinct classes per shard on average, what a random order gives on average)
    mixing: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        splits = ", ".join(f"{s} {n} samples in {k} shard{'s' * (k != 1)}" for s, (n, k) in self.counts.items())
        verdict = "OK" if self.ok else f"FAILED with {len(self.problems)} problem(s)"
        return f"verify {self.root}: dataset {self.dataset}, {splits or 'no splits'}: {verdict}"


def dropped_duplicates(info) -> dict[str, frozenset[str]]:
    """{tar: keys} whose repetitions ``--drop-duplicates`` left out (the split's ``skipped`` says so)."""
    out: dict[str, set[str]] = {}
    for entry in info.skipped:
        source, reason = str(entry.get("source", "")), str(entry.get("reason", ""))
        if reason.startswith(DUPLICATE) and "#" in source:
            tar, _, key = source.partition("#")
            out.setdefault(tar, set()).add(key)
    return {tar: frozenset(keys) for tar, keys in out.items()}


DUPLICATE = "duplicate"  # how a dropped repetition's reason starts in ``skipped``


def verify_dataset(
    root: str | os.PathLike,
    workers: int = 1,
    decode: bool = True,
    max_pixels: int = MAX_PIXELS,
    progress: bool = False,
    manifest: Manifest | None = None,
) -> VerifyReport:
    """Check every shard of a dataset against its index and the manifest (``manifest``: one not
    written yet, e.g. by an adoption in progress), ``workers`` tars at a time; per split, the
    problems found go into ``report.split_problems`` (what :func:`record_verdicts` records)."""
    root = Path(root)
    report = VerifyReport(root)
    try:
        manifest = manifest or read_manifest(root)
    except ShardFormatError as e:
        report.problems.append(str(e))
        return report
    report.dataset = manifest.dataset
    for split, info in manifest.splits.items():
        seen: dict[Path, str] = {}
        for name in info.shards:
            try:
                path = resolve_inside(root, name).resolve()
            except ShardFormatError as e:
                report.problems.append(str(e))
                continue
            if path in seen:  # its samples would be read twice (the loaders refuse it: manifest.split_files)
                report.problems.append(f"{MANIFEST}: split {split!r} lists the shard {name!r} twice ({seen[path]!r})")
            seen.setdefault(path, name)
    if report.problems:
        return report
    jobs = []
    for info in manifest.splits.values():
        dropped = dropped_duplicates(info)
        for name in info.shards:
            jobs.append(
                (root / name, info.labeled, manifest.num_classes, decode, max_pixels, dropped.get(name, frozenset()))
            )
    from tqdm import tqdm

    total = sum(info.num_samples for info in manifest.splits.values())
    checks = []
    with tqdm(total=total, unit="img", desc=f"verify {root.name}", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
            with ctx.Pool(min(workers, len(jobs))) as pool:
                for check in pool.imap(_check_shard_args, jobs, chunksize=1):
                    checks.append(check)
                    bar.update(check.num_samples)
        else:
            for job in jobs:
                checks.append(check_shard(*job))
                bar.update(checks[-1].num_samples)
    results = iter(checks)
    for split, info in manifest.splits.items():
        problems = report.split_problems.setdefault(split, [])
        found = 0
        shard_labels = []
        if info.shard_sizes and len(info.shard_sizes) != len(info.shards):
            problems.append(
                f"{MANIFEST}: split {split!r} has {len(info.shards)} shards but {len(info.shard_sizes)} shard_sizes"
            )
        for i, name in enumerate(info.shards):
            check = next(results)
            report.checks[name] = check
            problems.extend(check.problems)
            found += check.num_samples
            shard_labels.append(check.labels)
            expected = info.shard_sizes[i] if i < len(info.shard_sizes) else None
            if expected is not None and check.num_samples != expected and not check.problems:
                problems.append(f"{name} holds {check.num_samples} samples, {MANIFEST} says {expected}")
        if found != info.num_samples and not any(report.checks[n].problems for n in info.shards):
            problems.append(f"split {split!r}: {found} samples in its shards, {MANIFEST} says {info.num_samples}")
        report.problems.extend(problems)
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
            report.warnings.append(f"split {split!r}: {len(info.skipped)} sample(s) were skipped or dropped")
    listed = {name for info in manifest.splits.values() for name in info.shards}
    stray = sorted(p.name for p in root.glob("*.tar") if p.name not in listed)
    if stray:
        report.warnings.append(f"{len(stray)} tar file(s) not in {MANIFEST}, e.g. {stray[0]}")
    leftovers = sorted(p.name for p in root.glob("*" + TMP_SUFFIX))
    if leftovers:
        report.warnings.append(f"{len(leftovers)} unfinished .tmp file(s), e.g. {leftovers[0]}")
    return report


def record_verdicts(root: Path, manifest: Manifest, report: VerifyReport, by: str, max_pixels: int) -> None:
    """Set each checked split's ``check`` record in ``manifest`` (the caller writes it)."""
    for split, problems in report.split_problems.items():
        if split in manifest.splits:
            manifest.splits[split].check = make_verdict(
                root, manifest.splits[split], by, problems, max_pixels, manifest.num_classes
            )
