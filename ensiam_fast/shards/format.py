"""The shard format: WebDataset tars with a DALI index beside each, and a manifest.

See ``shards/README.md`` for the contract. This module holds the pieces every writer and reader
shares: names, writing one tar (with its index) atomically, safe file writing. The index is
``index.py``, the manifest ``manifest.py``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
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
