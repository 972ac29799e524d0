"""The shard format: WebDataset tars with a DALI index beside each, and a manifest.

See ``shards/README.md`` for the contract. This module holds the pieces every writer and reader
shares: writing one tar (with its index) atomically, and reading/writing ``manifest.json``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "ensiam_fast-shards/1"
INDEX_VERSION = "v1.2"  # the version line DALI's fn.readers.webdataset expects
TMP_SUFFIX = ".tmp"
TAR_BLOCK = 512


class ShardFormatError(ValueError):
    """A dataset directory that does not follow the shard contract."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


@dataclass
class ShardRecord:
    """What was written into one tar: its file name and sample count."""

    name: str
    num_samples: int


def _ustar_template() -> tuple[bytes, int]:
    """A USTAR header with everything but the name and size filled in, as ``tarfile`` writes it
    (mode 644, owner 0, mtime 0 so shards are reproducible), and its checksum so far."""
    h = bytearray(TAR_BLOCK)
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"
    return bytes(h), sum(h)


_HEADER, _HEADER_SUM = _ustar_template()
_RECORD = 20 * TAR_BLOCK  # tar's default blocking factor; tarfile pads the archive to it too


def _ustar_header(name: bytes, size: int) -> bytes:
    """One 512-byte USTAR header; building it directly is several times faster than tarfile."""
    if len(name) > 100:
        raise ShardFormatError(f"tar member name {name.decode()!r} is longer than 100 bytes")
    size_field = b"%011o\0" % size
    h = bytearray(_HEADER)
    h[: len(name)] = name
    h[124:136] = size_field
    h[148:156] = b"%06o\0 " % (_HEADER_SUM + sum(name) + sum(size_field))
    return bytes(h)


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> ShardRecord:
    """Write ``samples`` (key, {ext: bytes}) into the tar ``path`` and its DALI index.

    Both files are written under a temporary name and renamed when complete, index first and tar
    last, so a tar without ``.tmp`` always has a complete index beside it and an interrupted
    conversion never leaves a tar that looks finished.
    """
    path = Path(path)
    idx_path = path.with_suffix(".idx")
    tmp_tar = path.with_name(path.name + TMP_SUFFIX)
    tmp_idx = idx_path.with_name(idx_path.name + TMP_SUFFIX)
    index_lines: list[str] = []
    offset = 0
    try:
        with open(tmp_tar, "wb", buffering=1 << 20) as f:
            for key, parts in samples:
                if "." in key or "/" in key:
                    raise ShardFormatError(f"sample key {key!r} must not contain '.' or '/'")
                entries = []
                for ext, data in parts.items():
                    member = f"{key}.{ext}"
                    f.write(_ustar_header(member.encode(), len(data)))
                    f.write(data)
                    f.write(bytes(-len(data) % TAR_BLOCK))
                    entries.append(f"{ext} {offset + TAR_BLOCK} {len(data)} {member}")
                    offset += TAR_BLOCK + len(data) + (-len(data) % TAR_BLOCK)
                index_lines.append(" ".join(entries))
            end = offset + 2 * TAR_BLOCK  # two zero blocks mark the end of the archive
            f.write(bytes(end - offset + (-end % _RECORD)))
    except BaseException:
        tmp_tar.unlink(missing_ok=True)
        raise
    if not index_lines:
        tmp_tar.unlink(missing_ok=True)
        raise ShardFormatError(f"refusing to write an empty shard {path}")
    with open(tmp_idx, "w") as f:
        f.write(f"{INDEX_VERSION} {len(index_lines)}\n")
        f.write("\n".join(index_lines))
        f.write("\n")
    os.replace(tmp_idx, idx_path)
    os.replace(tmp_tar, path)
    return ShardRecord(path.name, len(index_lines))


def shard_bounds(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[start, end) of one rank's contiguous block of samples, the split DALI's readers use; both
    loaders (DALI and the torchvision reference) cut an epoch this way."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
    """(Re)make the DALI index of an existing tar (the ``wds2idx`` v1.2 format), written atomically."""
    samples: dict[str, list[str]] = {}
    with tarfile.open(tar_path, mode="r:") as tf:
        for member in tf:
            base = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or base.startswith("."):
                continue
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, []).append(f"{ext} {member.offset_data} {member.size} {member.name}")
    if not samples:
        raise ShardFormatError(f"shard {tar_path} holds no samples; re-run tools/make_shards.py")
    tmp = Path(str(idx_path) + TMP_SUFFIX)
    tmp.write_text(f"{INDEX_VERSION} {len(samples)}\n" + "\n".join(" ".join(v) for v in samples.values()) + "\n")
    os.replace(tmp, idx_path)


@dataclass
class SplitInfo:
    num_samples: int
    shards: list[str]
    labeled: bool
    shard_sizes: list[int] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


@dataclass
class Manifest:
    dataset: str
    classes: list[str]
    splits: dict[str, SplitInfo]
    image_size: list[int] | None = None  # (H, W) when every image has it, else None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ShardFormatError(
                f"dataset {self.dataset!r} has no split {name!r}; it has: {', '.join(sorted(self.splits))}"
            )
        return self.splits[name]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "splits": {
                name: {
                    "num_samples": s.num_samples,
                    "shards": list(s.shards),
                    "shard_sizes": list(s.shard_sizes),
                    "labeled": s.labeled,
                    "skipped": list(s.skipped),
                }
                for name, s in self.splits.items()
            },
            **({"extra": self.extra} if self.extra else {}),
        }


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically."""
    root = Path(root)
    path = root / MANIFEST
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read and check ``root/manifest.json``; errors name the file and say what to do."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ShardFormatError(
            f"dataset directory {root} does not exist; convert a dataset first with "
            f"`python tools/make_shards.py --dataset NAME --src SRC --out {root}`"
        )
    if not path.is_file():
        raise ShardFormatError(
            f"{path} is missing: {root} is not a converted dataset; make one with "
            f"`python tools/make_shards.py --dataset NAME --src SRC --out {root}`"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path} is not valid JSON ({e}); re-run tools/make_shards.py") from e
    for key in ("dataset", "classes", "splits"):
        if key not in raw:
            raise ShardFormatError(f"{path} lacks the key {key!r}; re-run tools/make_shards.py")
    splits = {}
    for name, s in raw["splits"].items():
        try:
            splits[name] = SplitInfo(
                num_samples=int(s["num_samples"]),
                shards=list(s["shards"]),
                labeled=bool(s["labeled"]),
                shard_sizes=list(s.get("shard_sizes", [])),
                skipped=list(s.get("skipped", [])),
            )
        except KeyError as e:
            raise ShardFormatError(f"{path}: split {name!r} lacks the key {e.args[0]!r}") from e
    return Manifest(
        dataset=raw["dataset"],
        classes=list(raw["classes"]),
        splits=splits,
        image_size=raw.get("image_size"),
        extra=raw.get("extra", {}),
    )


def shard_paths(root: str | os.PathLike, split: str) -> tuple[list[str], list[str]]:
    """Absolute tar and index paths of one split, checked to exist."""
    root = Path(root)
    info = read_manifest(root).split(split)
    tars, idxs = [], []
    for name in info.shards:
        tar = root / name
        if not tar.is_file():
            raise ShardFormatError(
                f"shard {tar} listed in {root / MANIFEST} is missing; re-run tools/make_shards.py "
                f"or check with `python tools/make_shards.py --verify {root}`"
            )
        tars.append(str(tar))
        idxs.append(str(root / index_name(name)))
    return tars, idxs


# --------------------------------------------------------------------------- verification

IMAGE_EXTS = ("jpg", "jpeg", "png")


@dataclass
class ShardCheck:
    """The outcome of checking one tar and its index."""

    name: str
    num_samples: int = 0
    problems: list[str] = field(default_factory=list)


def _tar_members(tar: Path, size: int, problems: list[str]) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member, in order; truncation becomes a problem."""
    members = []
    try:
        with tarfile.open(tar, mode="r:") as tf:
            while (m := tf.next()) is not None:
                if not m.isfile():
                    problems.append(f"{tar.name}: member {m.name!r} is not a regular file")
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
    lines = idx.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        problems.append(f"{idx.name}: first line should be '{INDEX_VERSION} <count>', found {lines[:1]}")
        return None
    samples = []
    for n, line in enumerate(lines[1:], 2):
        tok = line.split()
        if not tok or len(tok) % 4:
            problems.append(f"{idx.name} line {n}: expected groups of 'ext offset size name', found {line!r}")
            return None
        try:
            samples.append(
                [(tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]) for i in range(0, len(tok), 4)]
            )
        except ValueError:
            problems.append(f"{idx.name} line {n}: offsets and sizes must be integers, found {line!r}")
            return None
    if int(head[1]) != len(samples):
        problems.append(f"{idx.name}: header says {head[1]} samples but {len(samples)} lines follow")
    return samples


def _check_sample(
    name: str, key: str, parts: dict[str, bytes], labeled: bool, num_classes: int, decode: bool
) -> list[str]:
    from PIL import Image

    problems = []
    images = [e for e in parts if e in IMAGE_EXTS]
    if len(images) != 1:
        return [f"{name}: sample {key!r} should have one image (.jpg or .png), has {sorted(parts)}"]
    if labeled:
        cls = parts.get("cls")
        text = cls.decode("ascii", "replace").strip() if cls is not None else None
        if text is None or not text.isdigit() or int(text) >= num_classes:
            problems.append(
                f"{name}: sample {key!r} has label {text!r}, expected an integer in 0..{num_classes - 1}"
            )
    elif "cls" in parts:
        problems.append(f"{name}: sample {key!r} has a .cls but its split is unlabelled")
    if decode:
        try:
            with Image.open(io.BytesIO(parts[images[0]])) as img:
                img.load()
                if img.mode != "RGB":
                    problems.append(f"{name}: sample {key!r} image is {img.mode}, not 8-bit RGB")
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
        check.problems.append(
            f"{idx.name} does not list {len(unlisted)} member(s) of {tar.name}, e.g. {unlisted[0]!r}"
        )
    samples: dict[str, dict[str, bytes]] = {}
    with open(tar, "rb") as f:
        for name, off, sz in members:
            base = name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            f.seek(off)
            samples.setdefault(key, {})[ext] = f.read(sz)
    for key, parts in samples.items():
        check.problems.extend(_check_sample(tar.name, key, parts, labeled, num_classes, decode))
    check.num_samples = len(samples)
    if len(entries) != len(samples):
        check.problems.append(f"{idx.name} lists {len(entries)} samples but {tar.name} holds {len(samples)}")
    return check


def _check_shard_args(args: tuple) -> ShardCheck:
    return check_shard(*args)


@dataclass
class VerifyReport:
    """What ``verify_dataset`` found: samples per split, problems (fatal) and warnings."""

    root: Path
    dataset: str | None = None
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (samples, shards)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        splits = ", ".join(
            f"{s} {n} samples in {k} shard{'s' * (k != 1)}" for s, (n, k) in self.counts.items()
        )
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
        if info.shard_sizes and len(info.shard_sizes) != len(info.shards):
            report.problems.append(
                f"{MANIFEST}: split {split!r} has {len(info.shards)} shards but "
                f"{len(info.shard_sizes)} shard_sizes"
            )
        for i, name in enumerate(info.shards):
            check = next(results)
            report.problems.extend(check.problems)
            found += check.num_samples
            expected = info.shard_sizes[i] if i < len(info.shard_sizes) else None
            if expected is not None and check.num_samples != expected and not check.problems:
                report.problems.append(
                    f"{name} holds {check.num_samples} samples, {MANIFEST} says {expected}"
                )
        if found != info.num_samples:
            report.problems.append(
                f"split {split!r}: {found} samples in its shards, {MANIFEST} says {info.num_samples}"
            )
        report.counts[split] = (found, len(info.shards))
        if info.skipped:
            report.warnings.append(
                f"split {split!r}: {len(info.skipped)} source image(s) were skipped at conversion"
            )
    listed = {name for info in manifest.splits.values() for name in info.shards}
    stray = sorted(p.name for p in root.glob("*.tar") if p.name not in listed)
    if stray:
        report.warnings.append(f"{len(stray)} tar file(s) not in {MANIFEST}, e.g. {stray[0]}")
    leftovers = sorted(p.name for p in root.glob("*" + TMP_SUFFIX))
    if leftovers:
        report.warnings.append(f"{len(leftovers)} unfinished .tmp file(s), e.g. {leftovers[0]}")
    return report
