"""Checks a loader runs on a split before DALI reads it, so bad shards end in one clear error.

Why: DALI 2.4's CPU image decoder crashes the process (SIGSEGV in its thread pool, right after it
prints ``[jpeg_parser] Invalid marker``) when one image of a batch does not decode while the others
are being decoded; whatever the Python side does after the error, the crash can come first. So a
corrupt image has to be found before DALI decodes it. Cheap checks always run (every index read
and matched to its tar's size and the manifest); the content of a split (every label, every image
decoded at 1/8 scale by Pillow) is checked when its tars total at most ``CONTENT_CHECK_BYTES``,
once per process. Larger datasets rely on the decode check ``make_shards.py`` does when it converts
or adopts shards, and on ``make_shards.py --verify``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from ensiam_fast.data.spec import SplitSpec
from ensiam_fast.shards.format import IMAGE_EXTS, TAR_BLOCK, ShardFormatError
from ensiam_fast.shards.index import IndexEntry, read_index, split_member

CONTENT_CHECK_BYTES = 512 << 20
FIX = "`python tools/make_shards.py --verify {root} --drop-corrupt` removes corrupt samples"
_checked: set[tuple] = set()  # (tar, size, mtime) whose content was found good in this process


def _fail(root: Path, what: str) -> ShardFormatError:
    return ShardFormatError(f"{what}; {FIX.format(root=root)}, or re-make the dataset with tools/make_shards.py")


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
        size = os.path.getsize(tar)
        end = max((m.offset + m.size for sample in samples for m in sample), default=0)
        if end > size:
            raise _fail(
                root,
                f"shard {tar} is truncated: {size} bytes, but its index {Path(idx).name} lists data up to byte {end}",
            )
        if size < end + 2 * TAR_BLOCK:
            raise _fail(root, f"shard {tar} is truncated: it ends without the tar end-of-archive blocks")
        indices.append(samples)
    return indices


def _label_problem(data: bytes, num_classes: int) -> str | None:
    text = data.decode("ascii", "replace").strip()
    if not text.isdigit():
        return f"label {text!r} is not an ASCII decimal class index"
    if int(text) >= num_classes:
        return f"label {int(text)} is outside 0..{num_classes - 1} (the manifest has {num_classes} classes)"
    return None


def _image_problem(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # JPEG: DCT scaling
            img.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for a broken image
        return f"the image does not decode ({type(e).__name__}: {e})"
    return None


def check_content(
    root: Path, tars: list[str], indices: list[list[list[IndexEntry]]], labeled: bool, num_classes: int
) -> None:
    """Every label in range and every image decodable; the first bad sample raises, named."""
    for tar, samples in zip(tars, indices):
        st = os.stat(tar)
        key = (tar, st.st_size, st.st_mtime_ns)
        if key in _checked:
            continue
        with open(tar, "rb") as f:
            for sample in samples:
                for m in sample:
                    if m.ext in IMAGE_EXTS or (labeled and m.ext == "cls"):
                        f.seek(m.offset)
                        data = f.read(m.size)
                        problem = _image_problem(data) if m.ext in IMAGE_EXTS else _label_problem(data, num_classes)
                        if problem:
                            sample_key = split_member(m.member)[0]
                            raise _fail(root, f"shard {tar}, sample {sample_key!r}: {problem}")
        _checked.add(key)


def preflight(split: SplitSpec, idxs: list[str] | None = None) -> None:
    """Run the checks the module docstring describes on a split (with ``idxs`` instead of its own
    indices, e.g. regenerated ones); raises ``ShardFormatError`` naming the file."""
    idxs = split.idxs if idxs is None else idxs
    indices = check_structure(split.root, split.tars, idxs, split.shard_sizes)
    if sum(os.path.getsize(t) for t in split.tars) <= CONTENT_CHECK_BYTES:
        check_content(split.root, split.tars, indices, split.labeled, split.num_classes)
