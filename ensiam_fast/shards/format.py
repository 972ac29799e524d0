"""The shard format: WebDataset tars with a DALI index beside each, and a manifest.

See ``shards/README.md`` for the contract. This module holds the pieces every writer and reader
shares: writing one tar (with its index) atomically, and reading/writing ``manifest.json``.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ensiam_fast.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "ensiam_fast-shards/1"
INDEX_VERSION = "v1.2"  # the version line DALI's fn.readers.webdataset expects
TMP_SUFFIX = ".tmp"
TAR_BLOCK = 512
# The image members a sample may have, one of them (every one decodes on both loaders' backends);
# ``pipelines/dali.py`` (which imports nothing from here) lists the same in its reader.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXT = "cls"  # the class index as ASCII decimal, the WebDataset convention


class ShardFormatError(UserError, ValueError):
    """A dataset directory that does not follow the shard contract (a user error; still a ValueError for
    callers that catch that)."""


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
    index_lines: list[str] = []
    offset = 0
    try:
        with open_exclusive(tmp_tar, replace=True) as f:
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
    write_atomic(idx_path, f"{INDEX_VERSION} {len(index_lines)}\n" + "\n".join(index_lines) + "\n")
    os.replace(tmp_tar, path)
    return ShardRecord(path.name, len(index_lines))


def shard_bounds(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[start, end) of one rank's contiguous block of samples, the split DALI's readers use; both
    loaders (DALI and the torchvision reference) cut an epoch this way."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


# --------------------------------------------------------------------------- safe writing


def open_exclusive(path: Path, replace: bool = False):
    """A new file opened for binary writing that is never a link: created with O_EXCL|O_NOFOLLOW, so
    a file or symlink planted at ``path`` makes it fail instead of being written through. With
    ``replace`` an entry already there (ours from an interrupted run, or planted) is removed first."""
    if replace:
        Path(path).unlink(missing_ok=True)  # removes a link itself, never its target
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "wb", buffering=1 << 20)


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a fresh, exclusively created temporary file in the same folder, then
    rename it into place (a rename replaces a link at ``path``, never writes through it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class IndexEntry:
    """One member of a sample as the DALI index lists it."""

    ext: str
    offset: int  # of the member's data in the tar
    size: int
    member: str


def check_member_name(name: str, tar: str | os.PathLike) -> None:
    """Member names go into a whitespace-separated index: refuse control characters and spaces."""
    if not name or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in name):
        raise ShardFormatError(
            f"shard {tar} has a member named {name!r}, with a control character or a space; such "
            "names cannot be indexed: re-make the shard with tools/make_shards.py"
        )


def read_index(idx_path: str | os.PathLike) -> list[list[IndexEntry]]:
    """The samples of a DALI index (``v1.2``), one list of members per sample, in tar order."""
    idx_path = Path(idx_path)
    try:
        lines = idx_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"cannot read the index {idx_path} ({e})") from e
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardFormatError(f"{idx_path}: first line should be '{INDEX_VERSION} <count>', found {lines[:1]}")
    samples = []
    for n, line in enumerate(lines[1:], 2):
        tok = line.split()
        if not tok or len(tok) % 4:
            raise ShardFormatError(f"{idx_path} line {n}: expected groups of 'ext offset size name', found {line!r}")
        try:
            samples.append(
                [IndexEntry(tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]) for i in range(0, len(tok), 4)]
            )
        except ValueError:
            raise ShardFormatError(f"{idx_path} line {n}: offsets and sizes must be integers, found {line!r}") from None
    if int(head[1]) != len(samples):
        raise ShardFormatError(f"{idx_path}: header says {head[1]} samples but {len(samples)} lines follow")
    return samples


def index_count(idx_path: str | os.PathLike) -> int:
    """The sample count on an index's version line (without reading the rest)."""
    with open(idx_path) as f:
        head = f.readline().split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardFormatError(f"{idx_path}: first line should be '{INDEX_VERSION} <count>', got {' '.join(head)!r}")
    return int(head[1])


def split_member(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member, by WebDataset's rule: the key runs to the first dot of
    the file name (folders kept), the rest is the extension. Leading dots of the extension are
    dropped, so ``key..cls`` (what ``ShardWriter`` makes of a ``".cls"`` field) is a ``cls`` member."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lstrip(".")


def scan_tar(tar_path: str | os.PathLike) -> list[list[IndexEntry]]:
    """The samples of a tar, one list of members per sample in tar order (what its index lists)."""
    samples: dict[str, list[IndexEntry]] = {}
    with tarfile.open(tar_path, mode="r:") as tf:
        for member in tf:
            base = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or base.startswith("."):
                continue
            check_member_name(member.name, tar_path)
            key, ext = split_member(member.name)
            samples.setdefault(key, []).append(IndexEntry(ext, member.offset_data, member.size, member.name))
    return list(samples.values())


def format_index(samples: list[list[IndexEntry]]) -> str:
    lines = (" ".join(f"{m.ext} {m.offset} {m.size} {m.member}" for m in sample) for sample in samples)
    return f"{INDEX_VERSION} {len(samples)}\n" + "\n".join(lines) + "\n"


def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
    """(Re)make the DALI index of an existing tar (the ``wds2idx`` v1.2 format), written atomically
    through a fresh temporary file (see :func:`write_atomic`)."""
    samples = scan_tar(tar_path)
    if not samples:
        raise ShardFormatError(f"shard {tar_path} holds no samples; re-run tools/make_shards.py")
    write_atomic(Path(idx_path), format_index(samples))


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
    # Samples were written in a permutation seeded with this (None: the order is not ours, e.g. adopted)
    shuffle_seed: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        """One split, or several joined with ``+`` (``train+unlabeled``): their shards in that order, the
        samples of all of them, labelled when every part is (else the loaders yield no labels)."""
        parts = name.split("+")
        for part in parts:
            if part not in self.splits:
                raise ShardFormatError(
                    f"dataset {self.dataset!r} has no split {part!r}; it has: {', '.join(sorted(self.splits))}"
                    + (" (join several with '+', e.g. train+unlabeled)" if len(self.splits) > 1 else "")
                )
        if len(parts) == 1:
            return self.splits[name]
        if len(set(parts)) < len(parts):
            raise ShardFormatError(f"split {name!r} names a split twice; each part may appear once")
        infos = [self.splits[p] for p in parts]
        return SplitInfo(
            num_samples=sum(s.num_samples for s in infos),
            shards=[shard for s in infos for shard in s.shards],
            labeled=all(s.labeled for s in infos),
            # only when every part lists them (an older manifest may not): the loaders count them otherwise
            shard_sizes=[n for s in infos for n in s.shard_sizes] if all(s.shard_sizes for s in infos) else [],
            skipped=[x for s in infos for x in s.skipped],
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "shuffle_seed": self.shuffle_seed,
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
    write_atomic(path, json.dumps(manifest.to_json(), indent=2) + "\n")
    return path


def _is_int(v) -> bool:
    return type(v) is int  # not bool, not "48": a manifest field of another type is refused, never coerced


# each split field: (is it of the right type, what it must be)
_SPLIT_FIELDS = {
    "num_samples": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "shards": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of file names"),
    "labeled": (lambda v: type(v) is bool, "true or false (JSON booleans, not strings)"),
    "shard_sizes": (lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v), "a list of integers"),
    "skipped": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "a list of objects"),
}
_OPTIONAL = {"shard_sizes": [], "skipped": []}


def _read_split(path: Path, name: str, fields) -> SplitInfo:
    """One split of the manifest, every field of its exact JSON type (``"labeled": "false"`` would be
    true in Python: a wrong type is an error naming the field, not a guess)."""
    if not isinstance(fields, dict):
        raise ShardFormatError(f"{path}: split {name!r} must be an object; re-run tools/make_shards.py")
    values = {}
    for key, (ok, kind) in _SPLIT_FIELDS.items():
        if key not in fields and key in _OPTIONAL:
            values[key] = list(_OPTIONAL[key])
            continue
        if key not in fields:
            raise ShardFormatError(f"{path}: split {name!r} lacks the key {key!r}")
        if not ok(fields[key]):
            raise ShardFormatError(
                f"{path}: split {name!r} has a field of the wrong type: {key}={fields[key]!r} must be {kind}; "
                "fix the file or re-run tools/make_shards.py"
            )
        values[key] = fields[key]
    return SplitInfo(**values)


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
    if not isinstance(raw["splits"], dict) or not isinstance(raw["classes"], list):
        raise ShardFormatError(f"{path}: 'splits' must be a mapping and 'classes' a list; re-run tools/make_shards.py")
    size = raw.get("image_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)):
        raise ShardFormatError(f"{path}: image_size={size!r} must be [height, width] (integers) or null")
    splits = {name: _read_split(path, name, fields) for name, fields in raw["splits"].items()}
    return Manifest(
        dataset=raw["dataset"],
        classes=list(raw["classes"]),
        splits=splits,
        image_size=raw.get("image_size"),
        extra=raw.get("extra", {}),
        shuffle_seed=raw.get("shuffle_seed"),
    )


def resolve_inside(root: Path, name: str) -> Path:
    """``root / name`` for a shard name from the manifest, refused unless it stays inside ``root``
    (a downloaded dataset must not make us read, or write an index, anywhere else)."""
    path = Path(root) / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(Path(root).resolve()):
        raise ShardFormatError(
            f"{Path(root) / MANIFEST} lists the shard {name!r}, which is outside the dataset folder {root}; "
            "shard names must be paths inside it: fix the manifest or re-make the dataset"
        )
    return path


def split_files(root: str | os.PathLike, info: SplitInfo) -> tuple[list[str], list[str]]:
    """Absolute tar and index paths of a split, the tars checked to exist inside ``root``."""
    root = Path(root)
    tars, idxs = [], []
    for name in info.shards:
        tar = resolve_inside(root, name)
        if not tar.is_file():
            raise ShardFormatError(
                f"shard {tar} listed in {root / MANIFEST} is missing; re-run tools/make_shards.py "
                f"or check with `python tools/make_shards.py --verify {root}`"
            )
        tars.append(str(tar))
        idxs.append(str(root / index_name(name)))
    return tars, idxs


def shard_paths(root: str | os.PathLike, split: str) -> tuple[list[str], list[str]]:
    """Absolute tar and index paths of one split, checked to exist."""
    return split_files(root, read_manifest(root).split(split))
