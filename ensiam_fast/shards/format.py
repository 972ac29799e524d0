"""The shard format: WebDataset tars with a DALI index beside each, and a manifest.

See ``shards/README.md`` for the contract. This module holds the pieces every writer and reader
shares: names, writing one tar (with its index) atomically, safe file writing. The index is
``index.py``, the manifest ``manifest.py``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensiam_fast.errors import UserError
from ensiam_fast.rundir import atomic_write, write_bytes

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
    index_lines: list[str] = []
    offset = 0
    with atomic_write(path, buffering=1 << 20) as f:  # the one writer (ensiam_fast/rundir.py): renamed into place last
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
        if not index_lines:
            raise ShardFormatError(f"refusing to write an empty shard {path}")
        write_atomic(idx_path, f"{INDEX_VERSION} {len(index_lines)}\n" + "\n".join(index_lines) + "\n")
    return ShardRecord(path.name, len(index_lines))


def shard_bounds(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[start, end) of one rank's contiguous block of samples, the split DALI's readers use; both
    loaders (DALI and the torchvision reference) cut an epoch this way."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


# --------------------------------------------------------------------------- safe writing


def write_atomic(path: Path, text: str) -> None:
    """``path`` through the project's one writer (ensiam_fast/rundir.py: a fresh exclusive temporary in
    the same folder, fsynced, renamed; a link or FIFO at ``path`` is refused). UTF-8, with the bytes of
    a non-UTF-8 tar member name (read as surrogates) written back as they were."""
    write_bytes(path, text.encode("utf-8", "surrogateescape"))


# --------------------------------------------------------------------------- labels (.cls)

MAX_LABEL_DIGITS = 9  # a longer label is not a class index (and would overflow int32 heads, or memory)
MAX_CLASSES = 100_000  # make_shards.py --max-classes: more distinct labels than this is a mistake
MAX_LABEL_BYTES = 64  # a longer .cls is not a class index (readers read at most this + 1 bytes of one)
_LABEL_BLANKS = b"\x00 \t\r\n"


def parse_label(data: bytes) -> int:
    """A ``.cls`` member's class index: ASCII decimal, surrounding whitespace ignored, at most
    :data:`MAX_LABEL_DIGITS` digits. Raises ``ValueError`` saying what the text is instead."""
    if len(data) > MAX_LABEL_BYTES:
        raise ValueError(
            f"the label is longer than {MAX_LABEL_BYTES} bytes ({bytes(data)[:24]!r}...): not a class index"
        )
    text = bytes(data).strip(_LABEL_BLANKS)
    if not text or not text.isdigit() or not text.isascii():
        head = bytes(data)[:24]
        shown = repr(head.decode()) if head.isascii() else repr(head)  # non-ASCII: the bytes, not '\ufffd'
        raise ValueError(f"the label {shown} is not an ASCII decimal class index")
    if len(text.lstrip(b"0")) > MAX_LABEL_DIGITS:
        raise ValueError(f"the label {text[:24].decode()}{'...' if len(text) > 24 else ''} has more than "
                         f"{MAX_LABEL_DIGITS} digits: not a class index")  # fmt: skip
    return int(text)


def label_problem(data: bytes, num_classes: int) -> str | None:
    """What is wrong with a ``.cls`` member of a dataset of ``num_classes`` classes, or None."""
    try:
        label = parse_label(data)
    except ValueError as e:
        return str(e)
    if label >= num_classes:
        return f"label {label} is outside 0..{num_classes - 1} (the manifest has {num_classes} classes)"
    return None


def parse_labels(raw: np.ndarray) -> np.ndarray:
    """:func:`parse_label` over a batch: ``.cls`` bytes zero-padded to (B, L) -> int64 labels, in a
    handful of vector steps (the DALI loader's per-batch path)."""
    raw = np.asarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] == 0:
        raise ShardFormatError(f"empty .cls entries in a labelled split (label bytes of shape {raw.shape})")
    digit = (raw >= ord("0")) & (raw <= ord("9"))
    ignorable = np.isin(raw, np.frombuffer(_LABEL_BLANKS, dtype=np.uint8))
    bad = ~(digit | ignorable).all(axis=1) | ~digit.any(axis=1)
    # parse_label strips blanks at the ends only: a blank between two digits ('1 2') is no class index
    after_first = np.cumsum(digit, axis=1) > 0
    before_last = np.cumsum(digit[:, ::-1], axis=1)[:, ::-1] > 0
    bad |= (after_first & before_last & ~digit).any(axis=1)
    values = np.zeros(raw.shape[0], dtype=np.int64)
    significant = np.zeros(raw.shape[0], dtype=np.int64)  # digits after the leading zeros
    for col in range(raw.shape[1]):  # L = longest label's length
        d = digit[:, col]
        significant += d & ((values > 0) | (raw[:, col] != ord("0")))
        values = np.where(d & (significant <= MAX_LABEL_DIGITS), values * 10 + (raw[:, col] - ord("0")), values)
    bad |= significant > MAX_LABEL_DIGITS
    if bad.any():
        row = bytes(raw[np.flatnonzero(bad)[0]]).rstrip(b"\x00")
        try:
            parse_label(row)
        except ValueError as e:
            raise ShardFormatError(f".cls content: {e}") from None
    return values


def label_set_problem(counts: dict[int, int], num_names: int | None, max_classes: int = MAX_CLASSES) -> str | None:
    """What is wrong with a dataset's labels (``counts``: label -> samples), or None: they must be
    ``0..C-1``, with C the number of class names when ``--classes`` gave them, else the labels seen
    (no gaps), and C at most ``max_classes``. The text names the values and the fix."""
    if not counts:
        return None
    seen = sorted(counts)
    top = seen[-1]
    shown = ", ".join(map(str, seen[:5])) + (f", ... ({len(seen)} distinct)" if len(seen) > 5 else "")
    fix = (
        "give --classes FILE (one name per line: line i names label i; or the label values themselves, one per "
        "line, which --out NEW maps to 0..C-1 by line)"
    )
    if sum(1 for y in seen if 1_000_000 <= y < 100_000_000) * 2 > len(seen):
        fix = (
            "they look like WordNet offsets (ImageNet synsets: 01440764 is n01440764): give --classes FILE listing "
            "the synsets in label order (e.g. the first column of ImageNet's LOC_synset_mapping.txt) with --out NEW, "
            "which maps each label to its line"
        )
    if num_names is not None:
        if top >= num_names:
            return f"labels seen: {shown}; --classes names {num_names} classes (labels 0..{num_names - 1}): {fix}"
        return None
    if top + 1 > max_classes:
        return (
            f"labels seen: {shown}: the largest, {top}, would make {top + 1:,} classes (more than --max-classes "
            f"{max_classes:,}): {fix}"
        )
    if len(seen) < top + 1:
        missing = sorted(set(range(top + 1)) - set(seen))
        gap = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        return f"labels seen: {shown}: not 0..{top}, {len(missing)} value(s) never used ({gap}): {fix}"
    return None


# --------------------------------------------------------------------------- images

MAX_PIXELS = 8192 * 8192  # make_shards.py --max-pixels: larger images are refused before decoding
HEADER_BYTES = 1 << 16  # what is read of an image to find its dimensions (a JPEG's EXIF comes first)
MAX_IMAGE_BYTES = 1 << 30  # an image member larger than this is refused without being read
# Pillow modes both loaders decode to RGB (DALI's decoder on CPU, torchvision's with ImageReadMode.RGB);
# our conversions write RGB only, adopted WebDataset shards may hold the others (tests/test_adopt.py).
DECODED_MODES = ("RGB", "L", "CMYK", "P", "RGBA")
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_dims(b: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if marker in _SOF:
            if i + 9 > len(b):
                return None
            return int.from_bytes(b[i + 7 : i + 9], "big"), int.from_bytes(b[i + 5 : i + 7], "big")
        i += 2 + int.from_bytes(b[i + 2 : i + 4], "big")
    return None


def image_dims(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a JPEG, PNG or WebP (by content, whatever the member's
    extension), without decoding; None when the format is another or ``head`` is too short."""
    if head[:2] == b"\xff\xd8":
        return _jpeg_dims(head)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8X":
            return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
        if chunk == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if chunk == b"VP8 ":
            return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def pixel_problem(dims: tuple[int, int] | None, max_pixels: int = MAX_PIXELS) -> str | None:
    """The text for an image whose header claims more than ``max_pixels`` pixels, else None."""
    if dims is not None and dims[0] * dims[1] > max_pixels:
        return (f"the image header says {dims[0]}x{dims[1]} = {dims[0] * dims[1]:,} pixels, more than the limit "
                f"of {max_pixels:,} (--max-pixels; a decompression bomb or an image to scale down)")  # fmt: skip
    return None


def describe_image_error(e: BaseException, data: bytes | None = None) -> str:
    """A decoder's reason, without the in-memory object Pillow names (``<_io.BytesIO object at 0x..>``)."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image Pillow can read" + (f" (it starts with {bytes(data[:8])!r})" if data is not None else "")
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(e))
    return f"{type(e).__name__}: {text}"


def image_problem(data: bytes, max_pixels: int = MAX_PIXELS, decode: bool = True) -> str | None:
    """What is wrong with one image's bytes, or None: its header dimensions over ``max_pixels``
    (checked before anything is decoded; without ``decode``, that is all), then a decode (Pillow; JPEGs at 1/8 scale,
    which still reads every entropy-coded byte, so truncation and corruption show) to one of the
    modes the loaders read as RGB."""
    import warnings

    from PIL import Image

    dims = image_dims(data[:HEADER_BYTES])
    problem = pixel_problem(dims, max_pixels)
    if problem or (dims is not None and not decode):
        return problem
    try:  # Pillow reads the header of the formats image_dims does not know (or a JPEG's late frame header)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if (problem := pixel_problem(img.size, max_pixels)) or not decode:
                    return problem
                if img.format == "WEBP" and getattr(img, "n_frames", 1) > 1:  # torchvision refuses them
                    return (f"the image is an animated WebP ({img.n_frames} frames), which the torch loader "
                            "cannot decode; store one frame (a still WebP, PNG or JPEG)")  # fmt: skip
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # JPEG: DCT scaling
                img.load()
                if img.mode not in DECODED_MODES:
                    return (f"the image is {img.mode}, not one of the 8-bit modes the loaders read as RGB "
                            f"({', '.join(DECODED_MODES)})")  # fmt: skip
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"the image header claims too many pixels, a decompression bomb ({e})"
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for a broken image
        return f"the image does not decode ({describe_image_error(e, data)})"
    return None


def read_image_dims(f, offset: int, size: int) -> tuple[int, int] | None:
    """(width, height) of the image member at ``offset`` of the open file ``f``, reading as little of
    it as its header needs (4 KiB, or up to :data:`HEADER_BYTES` past a JPEG's EXIF block)."""
    f.seek(offset)
    head = f.read(min(size, 4096))
    dims = image_dims(head)
    if dims is None and size > len(head):
        head += f.read(min(size, HEADER_BYTES) - len(head))
        dims = image_dims(head)
    return dims
