"""Existing WebDataset shards (written by ``webdataset.ShardWriter`` or any other tool).

A folder of tars, each sample ``KEY.<image>`` (one of ``jpg``, ``jpeg``, ``png``, ``webp``) and, in
labelled splits, ``KEY.cls`` (the class index as ASCII decimal). :func:`scan_webdataset` finds the
tars, assigns them to splits and reads every sample's members and label; it serves both
``shards/adopt.py`` (manifest and indices written beside the tars, nothing copied) and
:func:`open_webdataset`, the source that ``make_shards.py --dataset webdataset --out NEW`` rewrites
into new shards in a seeded random order.

Splits: by default a tar belongs to ``train``, ``val`` or ``test`` when a word of its path (split
at anything but letters and digits) names it (``train``/``training``, ``val``/``valid``/
``validation``, ``test``/``testing``); ``--split NAME=GLOB`` (repeatable) replaces that rule, the
glob matched against the tar's path below the folder or its file name.
"""

from __future__ import annotations

import fnmatch
import multiprocessing as mp
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ensiam_fast.shards.format import (
    IMAGE_EXTS,
    LABEL_EXT,
    MANIFEST,
    MAX_CLASSES,
    MAX_LABEL_BYTES,
    label_set_problem,
    parse_label,
    read_image_dims,
)
from ensiam_fast.shards.index import NOT_ADJACENT, REORDER, IndexEntry, read_tar, split_member
from ensiam_fast.shards.sources.base import SPLIT_NAME, Sample, Source, SourceLayoutError, _stat_fingerprint

SPLIT_WORDS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
SPLIT_HINT = "name each split with --split NAME=GLOB (e.g. --split train='*train*.tar')"


@dataclass
class TarScan:
    """One tar as read: its samples' members (what its index lists), labels, image sizes."""

    name: str  # path below the dataset folder
    samples: list[list[IndexEntry]]
    labels: list[int | None]
    sizes: set[tuple[int, int]] = field(default_factory=set)  # (H, W) of its images
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (key, where) of repetitions left out


@dataclass
class WebDatasetScan:
    root: Path
    splits: dict[str, list[TarScan]]  # split -> its tars, in path order
    classes: list[str]
    notes: list[str] = field(default_factory=list)

    def labeled(self, split: str) -> bool:
        return any(label is not None for t in self.splits[split] for label in t.labels)


@dataclass(frozen=True)
class WebDatasetOptions:
    """How a folder of tars is read, for adopting it in place and for rewriting it alike
    (``make_shards.py``'s ``--split``, ``--classes``, ``--jobs``, ``--max-classes``, ``--drop-duplicates``)."""

    split_globs: dict[str, str] | None = None  # split -> glob; None: the split named by the tar's path
    classes_file: Path | None = None  # class names, one per line in label order
    workers: int = 1  # processes that read the tars
    max_classes: int = MAX_CLASSES
    drop_duplicates: bool = False  # leave out a repeated key instead of refusing the split


def parse_split_globs(specs: Sequence[str] | None) -> dict[str, str] | None:
    """``["train=*train*.tar", ...]`` -> {"train": "*train*.tar"}; None when none were given."""
    if not specs:
        return None
    globs: dict[str, str] = {}
    for spec in specs:
        name, sep, glob = spec.partition("=")
        if not sep or not glob or not SPLIT_NAME.fullmatch(name):
            raise SourceLayoutError(
                f"--split {spec!r}: expected NAME=GLOB, NAME made of letters, digits, '_' or '-' "
                "(e.g. train='*train*.tar')"
            )
        if name in globs:
            raise SourceLayoutError(f"--split names the split {name!r} twice")
        globs[name] = glob
    return globs


def find_tars(root: Path) -> list[str]:
    """Paths (below ``root``, sorted) of the tars in ``root`` and its sub-folders; refuses links that
    lead outside it (a dataset's manifest may only name files inside its folder)."""
    names = []
    for path in sorted(root.rglob("*.tar")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if not path.resolve().is_relative_to(root.resolve()):
            raise SourceLayoutError(
                f"{path} leads outside {root} (a link); shards must be files inside the dataset folder: "
                "copy or move them in, or give --out NEW to rewrite them"
            )
        names.append(rel.as_posix())
    return names


def _default_split(name: str) -> str | None:
    words = set(re.split(r"[^a-z0-9]+", name.lower()[: -len(".tar")]))
    found = [split for split, aliases in SPLIT_WORDS.items() if words.intersection(aliases)]
    if len(found) > 1:
        raise SourceLayoutError(f"{name}: its name names the splits {' and '.join(found)}; {SPLIT_HINT}")
    return found[0] if found else None


def assign_splits(root: Path, names: list[str], globs: dict[str, str] | None) -> tuple[dict[str, list[str]], list[str]]:
    """{split: tar names} and the notes to show (tars left out)."""
    splits: dict[str, list[str]] = {}
    left_out = []
    for name in names:
        if globs is None:
            split = _default_split(name)
        else:
            base = name.rsplit("/", 1)[-1]
            found = [s for s, g in globs.items() if fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(base, g)]
            if len(found) > 1:
                raise SourceLayoutError(f"{root / name} matches the --split globs of {' and '.join(found)}")
            split = found[0] if found else None
        if split is None:
            left_out.append(name)
        else:
            splits.setdefault(split, []).append(name)
    if globs is not None:
        empty = [s for s in globs if s not in splits]
        if empty:
            raise SourceLayoutError(f"--split {empty[0]}={globs[empty[0]]!r} matches no tar in {root}")
    elif left_out and not splits:
        raise SourceLayoutError(
            f"no tar in {root} has train, val or test in its name (e.g. {left_out[0]}); {SPLIT_HINT}"
        )
    notes = []
    if left_out:
        notes.append(f"{len(left_out)} tar(s) belong to no split and are left out, e.g. {root / left_out[0]}")
    return splits, notes


def scan_one(root: Path, name: str, drop_duplicates: bool = False) -> TarScan:
    """Read one tar: its members grouped by sample, each sample's label and image size. Members that
    are not regular files, and keys that come twice (unless ``drop_duplicates``: the later one is
    left out and listed in ``dropped``), are errors naming the tar and the byte offset."""
    tar = root / name
    try:
        contents = read_tar(tar)
    except OSError as e:
        raise SourceLayoutError(f"cannot read the tar {tar} ({e}); is it complete?") from e
    if contents.odd:
        raise SourceLayoutError(contents.odd[0])
    if contents.duplicates and not drop_duplicates:
        key, where = contents.duplicates[0]
        fix = REORDER if NOT_ADJACENT in where else "--drop-duplicates drops the later one"
        raise SourceLayoutError(f"sample key {key!r} comes twice in one tar: {where}; {fix}")
    scan = TarScan(name, contents.samples, [], dropped=list(contents.duplicates))
    with open(tar, "rb") as f:
        for sample in contents.samples:
            key = split_member(sample[0].member)[0]
            exts = [m.ext for m in sample]
            images = [m for m in sample if m.ext in IMAGE_EXTS]
            if len(images) != 1:
                raise SourceLayoutError(
                    f"{tar}: sample {key!r} has the members {exts}; each sample needs exactly one image "
                    f"({', '.join('.' + e for e in IMAGE_EXTS)})"
                )
            dims = read_image_dims(f, images[0].offset, images[0].size)
            if dims is not None:
                scan.sizes.add((dims[1], dims[0]))
            label = None
            cls = [m for m in sample if m.ext == LABEL_EXT]
            if cls:
                f.seek(cls[0].offset)
                try:
                    label = parse_label(f.read(min(cls[0].size, MAX_LABEL_BYTES + 1)))
                except ValueError as e:
                    raise SourceLayoutError(
                        f"{tar}: sample {key!r}: {e}; .{LABEL_EXT} must hold the class index as ASCII decimal "
                        "(what ShardWriter writes for an int)"
                    ) from None
            scan.labels.append(label)
    return scan


def _scan_args(args: tuple[Path, str, bool]) -> TarScan:
    return scan_one(*args)


def read_classes(path: Path) -> list[str]:
    """Class names, one per line, in label order (line i names label i)."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise SourceLayoutError(f"--classes {path}: cannot read it ({e})") from e
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise SourceLayoutError(f"--classes {path}: expected one class name per line, no empty lines")
    return names


def _drop_repeated_keys(root: Path, split: str, tars: list[TarScan], drop: bool) -> None:
    """A key in two tars of a split is one sample counted twice: an error naming both tars, or
    (``drop``) the later one left out and listed in its tar's ``dropped``."""
    first: dict[str, str] = {}
    for t in tars:
        keep = []
        for i, sample in enumerate(t.samples):
            key = split_member(sample[0].member)[0]
            if key not in first:
                first[key] = t.name
                keep.append(i)
                continue
            where = f"{root / first[key]} and again in {root / t.name}"
            if not drop:
                raise SourceLayoutError(
                    f"split {split!r}: sample key {key!r} is in {where} (the same sample counted twice); "
                    "--drop-duplicates drops the later one"
                )
            t.dropped.append((key, where))
        if len(keep) < len(t.samples):
            t.samples, t.labels = [t.samples[i] for i in keep], [t.labels[i] for i in keep]


def _label_map(classes: list[str], seen: set[int]) -> dict[int, int] | None:
    """label value -> line of ``--classes`` when the file lists the values themselves (``01440764`` or
    WordNet's ``n01440764``) and covers every label seen; else None."""
    lines: dict[int, int] = {}
    for i, name in enumerate(classes):
        digits = name[1:] if name[:1] in "nN" else name
        if digits.isdigit():
            lines.setdefault(int(digits), i)
    return lines if seen and all(y in lines for y in seen) else None


def _check_labels(root, splits, classes_file, max_classes: int, in_place: bool) -> tuple[list[str], list[str]]:
    """The class names and notes; labels not 0..C-1 are an error naming the values and the fix, or,
    rewriting (``--out``) with a ``--classes`` file listing the values, mapped to their lines."""
    counts: dict[int, int] = {}
    for tars in splits.values():
        for t in tars:
            for y in t.labels:
                if y is not None:
                    counts[y] = counts.get(y, 0) + 1
    classes = read_classes(classes_file) if classes_file is not None else None
    problem = label_set_problem(counts, None if classes is None else len(classes), max_classes)
    if problem and classes is not None and (mapping := _label_map(classes, set(counts))) is not None:
        if in_place:
            raise SourceLayoutError(
                f"{root}: the labels are the values --classes {classes_file} lists, not their line numbers; "
                "shards adopted in place keep their .cls: give --out NEW to rewrite them with labels 0..C-1"
            )
        for tars in splits.values():
            for t in tars:
                t.labels = [None if y is None else mapping[y] for y in t.labels]
        return classes, [f"labels mapped to the lines of --classes {classes_file} (0..{len(classes) - 1})"]
    if problem:
        top = max(counts)
        t, i = next((t, i) for ts in splits.values() for t in ts for i, y in enumerate(t.labels) if y == top)
        named = f", but --classes {classes_file} names {len(classes)} classes" if classes is not None else ""
        raise SourceLayoutError(
            f"{root / t.name}: sample {split_member(t.samples[i][0].member)[0]!r} has the label {top}{named}; {problem}"
        )
    if classes is not None:
        return classes, []
    top = max(counts, default=-1)
    notes = [f"class names are the labels 0..{top}; --classes FILE (one name per line) names them"] if counts else []
    return [str(i) for i in range(top + 1)], notes


def scan_webdataset(
    src: Path | None, options: WebDatasetOptions = WebDatasetOptions(), *, in_place: bool = True, progress: bool = False
) -> WebDatasetScan:
    """Find, assign and read the tars of a WebDataset folder; every problem names the tar and key."""
    if src is None:
        raise SourceLayoutError("webdataset: --src is required (the folder holding the .tar shards)")
    root = Path(src)
    if not root.is_dir():
        raise SourceLayoutError(f"webdataset: source folder {root} does not exist or is not a folder")
    names = find_tars(root)
    if not names:
        raise SourceLayoutError(f"webdataset: no .tar files in {root} or its sub-folders")
    by_split, notes = assign_splits(root, names, options.split_globs)
    jobs = [(root, name, options.drop_duplicates) for split in by_split.values() for name in split]
    from tqdm import tqdm

    scans = []
    with tqdm(total=len(jobs), unit="tar", desc=f"index {root.name}", disable=not progress) as bar:
        if options.workers > 1 and len(jobs) > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
            with ctx.Pool(min(options.workers, len(jobs))) as pool:
                for scan in pool.imap(_scan_args, jobs, chunksize=1):
                    scans.append(scan)
                    bar.update()
        else:
            for job in jobs:
                scans.append(scan_one(*job))
                bar.update()
    found = iter(scans)
    splits = {split: [next(found) for _ in tars] for split, tars in by_split.items()}
    for split, tars in splits.items():
        _drop_repeated_keys(root, split, tars, options.drop_duplicates)
        if not any(t.samples for t in tars):
            raise SourceLayoutError(f"split {split!r} ({root / tars[0].name}, ...) holds no samples")
        labeled = [(t, i) for t in tars for i, y in enumerate(t.labels) if y is not None]
        unlabeled = [(t, i) for t in tars for i, y in enumerate(t.labels) if y is None]
        if labeled and unlabeled:
            t, i = unlabeled[0]
            raise SourceLayoutError(
                f"{root / t.name}: sample {split_member(t.samples[i][0].member)[0]!r} has no .{LABEL_EXT} but "
                f"{len(labeled)} other sample(s) of split {split!r} have one; a split is labelled throughout "
                "or not at all"
            )
    dropped = sum(len(t.dropped) for tars in splits.values() for t in tars)
    if dropped:
        notes.append(f"--drop-duplicates: {dropped} repeated sample(s) left out (listed in the manifest's skipped)")
    classes, label_notes = _check_labels(root, splits, options.classes_file, options.max_classes, in_place)
    return WebDatasetScan(root, splits, classes, notes + label_notes)


class TarSplit:
    """A split's samples read straight from foreign tars (for rewriting them into new shards)."""

    def __init__(self, root: Path, tars: list[TarScan], labeled: bool):
        self.root = root
        self.labeled = labeled
        # (tar name, offset, size, key, label) per sample, in tar order
        self.entries = []
        for t in tars:
            for sample, label in zip(t.samples, t.labels):
                image = next(m for m in sample if m.ext in IMAGE_EXTS)
                self.entries.append((t.name, image.offset, image.size, split_member(image.member)[0], label))

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, indices: Sequence[int]) -> Iterator[Sample]:
        files: dict[str, object] = {}  # opened here, in the worker that reads (never shared by a fork)
        try:
            for i in indices:
                i = int(i)
                name, offset, size, key, label = self.entries[i]
                if name not in files:
                    files[name] = open(self.root / name, "rb")
                f = files[name]
                f.seek(offset)
                yield Sample(i, label if self.labeled else None, f"{name}:{key}", data=f.read(size))
        finally:
            for f in files.values():
                f.close()


def open_webdataset(src: Path | None, options: WebDatasetOptions = WebDatasetOptions()) -> Source:
    """The source ``make_shards.py --dataset webdataset --src DIR --out NEW`` rewrites."""
    scan = scan_webdataset(src, options, in_place=False)
    if (scan.root / MANIFEST).is_file():
        scan.notes.append(f"{scan.root / MANIFEST} is ignored: the tars themselves are read")
    tars = [scan.root / t.name for ts in scan.splits.values() for t in ts]
    extra = {
        "rewritten_from": {"format": "webdataset", "source": str(scan.root), "splits": options.split_globs or "names"}
    }
    return Source(
        scan.root.resolve().name,
        scan.classes,
        {s: TarSplit(scan.root, ts, scan.labeled(s)) for s, ts in scan.splits.items()},
        _stat_fingerprint(tars, scan.root),
        extra=extra,
        notes=scan.notes,
    )
