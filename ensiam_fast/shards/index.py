"""The DALI index of a tar (``v1.2``, the format of DALI's ``wds2idx``): reading, scanning a tar, writing.

See ``shards/README.md`` for the format.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ensiam_fast.shards.format import INDEX_VERSION, TAR_BLOCK, ShardFormatError, write_atomic

NAME_ERRORS = "surrogateescape"  # member names are bytes: a non-UTF-8 byte is kept as it is, indexed as such


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
        lines = idx_path.read_bytes().decode("utf-8", NAME_ERRORS).splitlines()
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


@dataclass(frozen=True)
class TarMember:
    """One member of a tar as its header says: ``kind`` is ``file``, ``dir``, ``hardlink``,
    ``symlink``, ``device`` (character, block, FIFO) or ``sparse``."""

    name: str  # decoded as UTF-8, other bytes kept as surrogates (NAME_ERRORS)
    header: int  # byte offset of its header
    offset: int  # of its data
    size: int
    kind: str
    target: str = ""  # what a link points to


def _kind(m: tarfile.TarInfo) -> str:
    if m.issparse():
        return "sparse"
    if m.isfile():
        return "file"
    if m.isdir():
        return "dir"
    if m.islnk():
        return "hardlink"
    if m.issym():
        return "symlink"
    return "device" if m.isdev() else "other"


def iter_members(tar_path: str | os.PathLike) -> Iterator[TarMember]:
    """Every member of a tar, read header by header (memory bounded by one header, whatever the
    tar's size). A tar that ends before its end-of-archive blocks, or whose next header is not a
    header (truncated or overwritten mid-way: ``tarfile`` would stop there without a word), raises
    ``ShardFormatError`` naming the tar and the byte offset."""
    tar_path = Path(tar_path)
    where = 0
    try:
        with tarfile.open(tar_path, mode="r:", encoding="utf-8", errors=NAME_ERRORS) as tf:
            while (m := tf.next()) is not None:
                tf.members.clear()  # tarfile keeps every header otherwise (a million-sample tar)
                where = m.offset_data + m.size
                yield TarMember(m.name, m.offset, m.offset_data, m.size, _kind(m), m.linkname)
            end = tf.offset
    except (tarfile.TarError, EOFError) as e:
        raise ShardFormatError(
            f"{tar_path}: truncated or corrupt after byte {where} ({e}); re-make or re-download the tar"
        ) from e
    with open(tar_path, "rb") as f:
        f.seek(end)
        trailer = f.read(2 * TAR_BLOCK)
    if len(trailer) < 2 * TAR_BLOCK or trailer.strip(b"\0"):
        raise ShardFormatError(
            f"{tar_path}: truncated or corrupt at byte {end}: neither a member header nor the end-of-archive "
            "blocks there; re-make or re-download the tar"
        )


def odd_member(m: TarMember, tar: str | os.PathLike) -> str:
    """The text for a member that is not a regular file (no index can point at its data)."""
    what = {
        "hardlink": f"a hard link to {m.target!r}",
        "symlink": f"a symbolic link to {m.target!r}",
        "device": "a device or FIFO",
        "sparse": "a sparse file",
    }.get(m.kind, f"of type {m.kind}")
    return (
        f"{tar}: member {m.name!r} (header at byte {m.header}) is {what}, not a regular file; its sample cannot "
        "be read: re-make the tar from real files (GNU tar: --hard-dereference, --dereference)"
    )


@dataclass
class TarContents:
    """A tar's samples (members of one key, adjacent, in tar order: what its index lists) and what
    stops it being indexed as it is: members that are not regular files, keys that come twice."""

    samples: list[list[IndexEntry]]
    odd: list[str]  # one line per member that is not a regular file
    duplicates: list[tuple[str, str]]  # (key, "where first, where again") of each later repetition


# A key back with an extension its first members lack: one sample's members apart (`tar cf DIR` lists
# files in directory order), not a second sample; --drop-duplicates cannot mend it.
NOT_ADJACENT = "the members of one sample are not adjacent (`tar --sort=name -cf ...` writes them in a row)"
REORDER = "re-create the tar with each sample's members in a row"


def read_tar(tar_path: str | os.PathLike) -> TarContents:
    """Group a tar's members into samples by WebDataset's key rule (:func:`split_member`).

    A key's members must be adjacent and each extension come once: a key that comes back after
    another (or the same member twice) is a duplicate, listed and left out of ``samples`` (the first
    one is kept). Folders and hidden files (``.name``) are skipped; other non-regular members are
    listed in ``odd`` and left out."""
    samples: list[list[IndexEntry]] = []
    odd: list[str] = []
    duplicates: list[tuple[str, str]] = []
    first_at: dict[str, int] = {}  # key -> header offset of its first member
    first_sample: dict[str, int] = {}  # key -> its position in samples
    current = None
    skipping = None  # the key of a repetition being left out
    for m in iter_members(tar_path):
        base = m.name.rsplit("/", 1)[-1]
        if m.kind == "dir" or base.startswith("."):
            continue
        if m.kind != "file":
            odd.append(odd_member(m, tar_path))
            continue
        check_member_name(m.name, tar_path)
        key, ext = split_member(m.name)
        if key == skipping:
            continue
        if key == current and all(e.ext != ext for e in samples[-1]):
            samples[-1].append(IndexEntry(ext, m.offset, m.size, m.name))
            continue
        if key in first_at:
            where = f"{tar_path} byte {first_at[key]}, again at byte {m.header} ({m.name!r})"
            if all(e.ext != ext for e in samples[first_sample[key]]):  # a member the first run lacks
                where += f": {NOT_ADJACENT}"
            duplicates.append((key, where))
            current, skipping = None, key
            continue
        first_at[key] = m.header
        first_sample[key] = len(samples)
        current, skipping = key, None
        samples.append([IndexEntry(ext, m.offset, m.size, m.name)])
    return TarContents(samples, odd, duplicates)


def scan_tar(tar_path: str | os.PathLike) -> list[list[IndexEntry]]:
    """The samples of a tar that can be indexed as it is; a non-regular member or a repeated key
    raises ``ShardFormatError`` naming them."""
    contents = read_tar(tar_path)
    if contents.odd:
        raise ShardFormatError(contents.odd[0])
    if contents.duplicates:
        key, where = contents.duplicates[0]
        raise ShardFormatError(f"sample key {key!r} comes twice in one tar: {where}")
    return contents.samples


def format_index(samples: list[list[IndexEntry]]) -> str:
    lines = (" ".join(f"{m.ext} {m.offset} {m.size} {m.member}" for m in sample) for sample in samples)
    return f"{INDEX_VERSION} {len(samples)}\n" + "\n".join(lines) + "\n"


def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
    """(Re)make the DALI index of an existing tar (the ``wds2idx`` v1.2 format), written atomically
    through a fresh temporary file (see :func:`write_atomic`). A symbolic link planted where the
    index goes (an index is never one of ours) is removed first, never followed: the index replaces it."""
    samples = scan_tar(tar_path)
    if not samples:
        raise ShardFormatError(f"shard {tar_path} holds no samples; re-run tools/make_shards.py")
    if Path(idx_path).is_symlink():
        Path(idx_path).unlink()  # the link itself, not its target
    write_atomic(Path(idx_path), format_index(samples))
