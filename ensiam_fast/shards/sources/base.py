"""What every source reader shares: the sample and split types, image conversion, layout checks.

Each reader module (one per on-disk layout) has an ``open_*`` function that checks the layout up
front (so a wrong ``--src`` fails before anything is written, naming the file or folder it
expected) and returns a :class:`Source`: the class names and, per split, a reader that yields
samples for a range of indices. Readers are small and picklable so that worker processes can each
read their own range.

Images come out as 8-bit RGB. :func:`to_rgb8` documents how other modes are converted.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ensiam_fast.shards.format import ShardFormatError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


class SourceLayoutError(ShardFormatError):
    """The source folder is missing or does not have the layout the dataset needs."""


@dataclass
class Sample:
    """One source image: ``pixels`` (H, W, 3) uint8 RGB, ``path`` to an image file, or the file's ``data``."""

    index: int
    label: int | None
    source: str  # what the manifest's ``skipped`` list names
    pixels: np.ndarray | None = None
    path: Path | None = None
    data: bytes | None = None


class LabelledRows:
    """What the split readers share: ``labels``, one per sample (None: an unlabelled split)."""

    labels: Sequence[int] | np.ndarray | None

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def label(self, i: int) -> int | None:
        return None if self.labels is None else int(self.labels[i])


class ArraySplit(LabelledRows):
    """A split held as a uint8 array (N, H, W, 3) in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, origin: str):
        self.images, self.labels, self.origin = images, labels, origin

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: Sequence[int]) -> Iterator[Sample]:
        for i in map(int, indices):
            yield Sample(i, self.label(i), f"{self.origin}#{i}", pixels=self.images[i])


class FileSplit(LabelledRows):
    """A split of image files with their labels (``None`` when unlabelled)."""

    def __init__(self, root: Path, paths: Sequence[str], labels: Sequence[int] | None):
        self.root, self.paths, self.labels = root, list(paths), None if labels is None else list(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, indices: Sequence[int]) -> Iterator[Sample]:
        for i in map(int, indices):
            yield Sample(i, self.label(i), self.paths[i], path=self.root / self.paths[i])


class SplitReader(Protocol):
    """What a source's split provides (``ArraySplit``, ``FileSplit``, and the readers of the modules
    that need their own: ``stl10.Stl10Split``, ``webdataset.TarSplit``)."""

    @property
    def labeled(self) -> bool: ...

    def __len__(self) -> int: ...

    def read(self, indices: Sequence[int]) -> Iterator[Sample]: ...


@dataclass
class Source:
    """A dataset ready to convert: classes in label order, readers per split, a fingerprint."""

    dataset: str
    classes: list[str]
    splits: dict[str, SplitReader]
    fingerprint: str  # changes when the source files change; resume checks it
    extra: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- image conversion


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB.

    Transparency (RGBA, LA, PA, palette with a transparent colour) is composited on white, as a
    viewer on a white page shows it; 16- and 32-bit grayscale keep their top 8 bits (values are
    taken as 16-bit); CMYK, palette, 1-bit, grayscale and other modes use Pillow's conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        wide = np.asarray(img).astype(np.int64)
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "F":
        gray = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    return img.convert("RGB")


# --------------------------------------------------------------------------- helpers


def _need(path: Path, what: str, dataset: str) -> Path:
    if not path.exists():
        raise SourceLayoutError(f"{dataset}: expected {what} at {path}, but it does not exist")
    return path


def _locate(src: Path | None, dataset: str, folder: str, marker: str) -> Path:
    """``src`` may be the extracted ``folder`` itself or its parent; return the folder."""
    if src is None:
        raise SourceLayoutError(f"{dataset}: --src is required (the folder {folder}/ or its parent)")
    src = Path(src)
    if not src.is_dir():
        raise SourceLayoutError(f"{dataset}: source folder {src} does not exist or is not a folder")
    for candidate in (src, src / folder):
        if (candidate / marker).exists():
            return candidate
    raise SourceLayoutError(
        f"{dataset}: expected {src / folder / marker} (or {src / marker} when --src is the {folder}/ "
        f"folder itself); the extracted {folder}/ release is needed"
    )


def _stat_fingerprint(files: Sequence[Path], root: Path) -> str:
    """Cheap content fingerprint: relative names, sizes and modification times."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def pil_from_pixels(pixels: np.ndarray) -> Image.Image:
    """A Pillow view of an (H, W, 3) uint8 array (no copy when it is contiguous)."""
    pixels = np.ascontiguousarray(pixels)
    h, w, _ = pixels.shape
    return Image.frombuffer("RGB", (w, h), pixels, "raw", "RGB", 0, 1)
