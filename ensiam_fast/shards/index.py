"""The DALI index of a tar (``v1.2``, the format of DALI's ``wds2idx``): reading, scanning a tar, writing.

See ``shards/README.md`` for the format.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ensiam_fast.shards.format import INDEX_VERSION, ShardFormatError, write_atomic


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
