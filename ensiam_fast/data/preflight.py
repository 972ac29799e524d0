"""Checks a loader runs on a split before DALI reads it, so bad shards end in one clear error.

Why: DALI 2.4's CPU image decoder crashes the process (SIGSEGV in its thread pool, right after it
prints ``[jpeg_parser] Invalid marker``) when one image of a batch does not decode while the others
are being decoded, and an image whose header claims 30000x30000 pixels costs gigabytes and a minute
per step; whatever the Python side does after the error, the crash can come first. So bad data has
to be found before DALI reads it.

* Always: every index parsed and matched to its tar's size and the manifest's counts.
* A tar that passed the split's content check (``shards/verdict.py``) and is unchanged since needs
  nothing more: conversion, adoption or ``make_shards.py --verify`` checked every image and label.
* Every other tar (never checked, or changed since; ``gate_split`` refuses a split that failed and
  warns for these) is checked here, once per process: every label, and every image's header against
  the pixel limit (a bomb slipped in after the check costs one error line, not memory); and when
  those tars total at most ``CONTENT_CHECK_BYTES``, every image decoded (JPEGs at 1/8 scale) as well.
  Decoding a large dataset at every start would cost hours: ``--verify`` does it once and records it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ensiam_fast.data.spec import SplitSpec
from ensiam_fast.shards.format import (
    IMAGE_EXTS,
    LABEL_EXT,
    MAX_LABEL_BYTES,
    MAX_PIXELS,
    TAR_BLOCK,
    ShardFormatError,
    image_problem,
    label_problem,
    pixel_problem,
    read_image_dims,
)
from ensiam_fast.shards.index import IndexEntry, read_index, split_member

CONTENT_CHECK_BYTES = 512 << 20
FIX = "`python tools/make_shards.py --verify {root} --drop-corrupt` removes corrupt samples"
INDEX_FIX = (
    "re-make the dataset with tools/make_shards.py (the same command again rewrites an index that does not match)"
)
_checked: set[tuple] = set()  # (tar, size, mtime, decoded) whose content was found good in this process


def _fail(root: Path, what: str) -> ShardFormatError:
    return ShardFormatError(f"{what}; {FIX.format(root=root)}, or re-make the dataset with tools/make_shards.py")


def order_problem(samples: list[list[IndexEntry]]) -> str | None:
    """What makes an index's members impossible in a tar, or None: a tar member's data starts on a
    512-byte block after its own header, past the data of the member before it, so two entries that
    overlap (an offset edited to point at another member, say) show without reading the tar."""
    members = sorted((m.offset, m.size, m.member) for sample in samples for m in sample)
    end, before = 0, None  # the first byte a member's header may start at; the member ending there
    for offset, size, name in members:
        if offset % TAR_BLOCK or offset < end + TAR_BLOCK or size < 0:
            where = f"the data of {before!r} ends at byte {end}" if before else "a tar's first data is at byte 512"
            return f"member {name!r} at byte {offset} (size {size}): {where}, a header must come between"
        end, before = -(-(offset + size) // TAR_BLOCK) * TAR_BLOCK, name
    return None


def _ends_whole(tar: str, size: int) -> bool:
    """Whether a tar ends as a complete one does: whole blocks, the last two of them zeros."""
    if size % TAR_BLOCK or size < 2 * TAR_BLOCK:
        return False
    with open(tar, "rb") as f:
        f.seek(size - 2 * TAR_BLOCK)
        return not any(f.read(2 * TAR_BLOCK))


def check_structure(
    root: Path, tars: list[str], idxs: list[str], shard_sizes: list[int]
) -> list[list[list[IndexEntry]]]:
    """Every index parsed and matched to its tar (size) and to the manifest (sample count)."""
    indices = []
    for i, (tar, idx) in enumerate(zip(tars, idxs)):
        samples = read_index(idx)
        if shard_sizes and i < len(shard_sizes) and len(samples) != shard_sizes[i]:
            raise _fail(
                root,
                f"the index {idx} lists {len(samples)} samples but the manifest says {shard_sizes[i]} "
                f"for {Path(tar).name}: the index does not match its tar",
            )
        if problem := order_problem(samples):
            raise ShardFormatError(f"the index {idx} does not match its tar ({problem}); {INDEX_FIX}")
        size = os.path.getsize(tar)
        end = max((m.offset + m.size for sample in samples for m in sample), default=0)
        if end > size and _ends_whole(tar, size):  # the tar is whole: the index is what is wrong
            raise ShardFormatError(
                f"the index {idx} lists data up to byte {end}, past the end of its shard {tar} ({size} bytes, "
                f"ending with the end-of-archive blocks): the index does not match its tar; {INDEX_FIX}"
            )
        if end > size:
            raise _fail(
                root,
                f"shard {tar} is truncated: {size} bytes, but its index {Path(idx).name} lists data up to byte {end}",
            )
        if size < end + 2 * TAR_BLOCK:
            raise _fail(root, f"shard {tar} is truncated: it ends without the tar end-of-archive blocks")
        indices.append(samples)
    return indices


def _member_problem(f, m: IndexEntry, num_classes: int, decode: bool, max_pixels: int) -> str | None:
    if m.ext == LABEL_EXT:
        f.seek(m.offset)
        return label_problem(f.read(min(m.size, MAX_LABEL_BYTES + 1)), num_classes)
    dims = read_image_dims(f, m.offset, m.size)
    if problem := pixel_problem(dims, max_pixels):
        return problem
    if decode or dims is None:  # a format (or a header) only Pillow reads: it reads the header
        f.seek(m.offset)
        return image_problem(f.read(m.size), max_pixels, decode)
    return None


def check_content(
    root: Path,
    tars: list[str],
    indices: list[list[list[IndexEntry]]],
    labeled: bool,
    num_classes: int,
    decode: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> None:
    """Every label in range and every image's header within ``max_pixels`` (and, with ``decode``,
    every image decodable); the first bad sample raises, named."""
    for tar, samples in zip(tars, indices):
        st = os.stat(tar)
        key = (tar, st.st_size, st.st_mtime_ns, decode)
        if key in _checked or (tar, st.st_size, st.st_mtime_ns, True) in _checked:
            continue
        with open(tar, "rb") as f:
            if hasattr(os, "posix_fadvise"):  # a header here and there: no read-ahead of whole images
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM if not decode else os.POSIX_FADV_NORMAL)
            for sample in samples:
                for m in sample:
                    if m.ext in IMAGE_EXTS or (labeled and m.ext == LABEL_EXT):
                        if problem := _member_problem(f, m, num_classes, decode, max_pixels):
                            raise _fail(root, f"shard {tar}, sample {split_member(m.member)[0]!r}: {problem}")
        _checked.add(key)


def preflight(split: SplitSpec, idxs: list[str] | None = None) -> None:
    """Run the checks the module docstring describes on a split (with ``idxs`` instead of its own
    indices, e.g. regenerated ones); raises ``ShardFormatError`` naming the file."""
    idxs = split.idxs if idxs is None else idxs
    indices = check_structure(split.root, split.tars, idxs, split.shard_sizes)
    untrusted = [i for i, tar in enumerate(split.tars) if tar not in split.trusted]
    if not untrusted:
        return
    decode = sum(os.path.getsize(split.tars[i]) for i in untrusted) <= CONTENT_CHECK_BYTES
    tars, indices = [split.tars[i] for i in untrusted], [indices[i] for i in untrusted]
    check_content(split.root, tars, indices, split.labeled, split.num_classes, decode)
