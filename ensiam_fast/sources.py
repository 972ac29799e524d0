"""Readers for the on-disk dataset layouts that ``tools/make_shards.py`` converts.

Each ``open_*`` function checks the layout up front (so a wrong ``--src`` fails before anything
is written, naming the file or folder it expected) and returns a :class:`Source`: the class
names and, per split, a reader that yields samples for a range of indices. Readers are small and
picklable so that worker processes can each read their own range.

Images come out as 8-bit RGB. :func:`to_rgb8` documents how other modes are converted.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ensiam_fast.shards import ShardFormatError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL10_SIDE = 96
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
DATASETS = ("cifar10", "cifar100", "stl10", "tiny-imagenet", "imagefolder", "digits")


class SourceLayoutError(ShardFormatError):
    """The source folder is missing or does not have the layout the dataset needs."""


@dataclass
class Sample:
    """One source image: ``pixels`` (H, W, 3) uint8 RGB, or ``path`` to an image file."""

    index: int
    label: int | None
    source: str  # what the manifest's ``skipped`` list names
    pixels: np.ndarray | None = None
    path: Path | None = None


class ArraySplit:
    """A split held as a uint8 array (N, H, W, 3) in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, origin: str):
        self.images, self.labels, self.origin = images, labels, origin

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.images)

    def read(self, start: int, end: int) -> Iterator[Sample]:
        for i in range(start, end):
            label = None if self.labels is None else int(self.labels[i])
            yield Sample(i, label, f"{self.origin}#{i}", pixels=self.images[i])


class Stl10Split:
    """One STL-10 ``*_X.bin`` (read lazily through a memmap: the unlabelled file is 2.6 GB)."""

    def __init__(self, x_path: Path, labels: np.ndarray | None, count: int):
        self.x_path, self.labels, self.count = x_path, labels, count

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return self.count

    def read(self, start: int, end: int) -> Iterator[Sample]:
        side = STL10_SIDE
        raw = np.memmap(self.x_path, dtype=np.uint8, mode="r", shape=(self.count, 3, side, side))
        # Each channel is stored column-major: (N, C, x, y) -> (N, y, x, C).
        block = np.ascontiguousarray(raw[start:end].transpose(0, 3, 2, 1))
        del raw
        for j, i in enumerate(range(start, end)):
            label = None if self.labels is None else int(self.labels[i])
            yield Sample(i, label, f"{self.x_path.name}#{i}", pixels=block[j])


class FileSplit:
    """A split of image files with their labels (``None`` when unlabelled)."""

    def __init__(self, root: Path, paths: Sequence[str], labels: Sequence[int] | None):
        self.root, self.paths, self.labels = root, list(paths), None if labels is None else list(labels)

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, start: int, end: int) -> Iterator[Sample]:
        for i in range(start, end):
            label = None if self.labels is None else self.labels[i]
            yield Sample(i, label, self.paths[i], path=self.root / self.paths[i])


@dataclass
class Source:
    """A dataset ready to convert: classes in label order, readers per split, a fingerprint."""

    dataset: str
    classes: list[str]
    splits: dict[str, ArraySplit | Stl10Split | FileSplit]
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


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _load_pickle(path: Path, dataset: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a broken release
        raise SourceLayoutError(f"{dataset}: {path} is not a readable CIFAR pickle ({e})") from e
    if not isinstance(raw, dict):
        raise SourceLayoutError(f"{dataset}: {path} should hold a dict, found {type(raw).__name__}")
    return {_text(k): v for k, v in raw.items()}


def _cifar_arrays(path: Path, label_key: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path, dataset)
    for key in ("data", label_key):
        if key not in batch:
            raise SourceLayoutError(f"{dataset}: {path} lacks the key {key!r}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise SourceLayoutError(
            f"{dataset}: {path}: 'data' should be (N, 3072) with N labels, found {data.shape} "
            f"and {len(labels)} labels"
        )
    # Rows hold the red, green, blue 32x32 planes one after another.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


# --------------------------------------------------------------------------- datasets


def open_cifar10(src: Path | None) -> Source:
    root = _locate(src, "cifar10", "cifar-10-batches-py", "batches.meta")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    files = [_need(root / n, f"the CIFAR-10 file {n}", "cifar10") for n in names]
    meta = _load_pickle(root / "batches.meta", "cifar10")
    if "label_names" not in meta:
        raise SourceLayoutError(f"cifar10: {root / 'batches.meta'} lacks the key 'label_names'")
    parts = [_cifar_arrays(root / f"data_batch_{i}", "labels", "cifar10") for i in range(1, 6)]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _cifar_arrays(root / "test_batch", "labels", "cifar10")
    return Source(
        "cifar10",
        [_text(n) for n in meta["label_names"]],
        {
            "train": ArraySplit(train_x, train_y, "data_batch_1..5"),
            "test": ArraySplit(test_x, test_y, "test_batch"),
        },
        _stat_fingerprint(files, root),
    )


def open_cifar100(src: Path | None) -> Source:
    root = _locate(src, "cifar100", "cifar-100-python", "meta")
    files = [_need(root / n, f"the CIFAR-100 file {n}", "cifar100") for n in ("train", "test", "meta")]
    meta = _load_pickle(root / "meta", "cifar100")
    if "fine_label_names" not in meta:
        raise SourceLayoutError(f"cifar100: {root / 'meta'} lacks the key 'fine_label_names'")
    train_x, train_y = _cifar_arrays(root / "train", "fine_labels", "cifar100")
    test_x, test_y = _cifar_arrays(root / "test", "fine_labels", "cifar100")
    extra = {}
    if "coarse_label_names" in meta:
        extra["coarse_classes"] = [_text(n) for n in meta["coarse_label_names"]]
    return Source(
        "cifar100",
        [_text(n) for n in meta["fine_label_names"]],
        {"train": ArraySplit(train_x, train_y, "train"), "test": ArraySplit(test_x, test_y, "test")},
        _stat_fingerprint(files, root),
        extra=extra,
    )


def open_stl10(src: Path | None) -> Source:
    root = _locate(src, "stl10", "stl10_binary", "train_X.bin")
    image_bytes = 3 * STL10_SIDE * STL10_SIDE
    splits: dict[str, Stl10Split] = {}
    files = []
    notes = []
    for split in ("train", "test", "unlabeled"):
        x_path = root / f"{split}_X.bin"
        if split == "unlabeled" and not x_path.exists():
            notes.append(f"stl10: {x_path} not found, so the 'unlabeled' split is left out")
            continue
        _need(x_path, f"the STL-10 image file {x_path.name}", "stl10")
        size = x_path.stat().st_size
        if size % image_bytes:
            raise SourceLayoutError(
                f"stl10: {x_path} is {size} bytes, not a multiple of {image_bytes} (3x96x96); "
                "the file is truncated or not an STL-10 binary"
            )
        count = size // image_bytes
        files.append(x_path)
        labels = None
        if split != "unlabeled":
            y_path = _need(root / f"{split}_y.bin", f"the STL-10 label file {split}_y.bin", "stl10")
            files.append(y_path)
            raw = np.fromfile(y_path, dtype=np.uint8)
            if len(raw) != count or (count and (raw.min() < 1 or raw.max() > 10)):
                raise SourceLayoutError(
                    f"stl10: {y_path} should hold {count} labels in 1..10 (one per image of "
                    f"{x_path.name}), found {len(raw)} values"
                )
            labels = raw.astype(np.int64) - 1  # 1..10 on disk, 0..9 in the shards
        splits[split] = Stl10Split(x_path, labels, count)
    classes = STL10_CLASSES
    names_file = root / "class_names.txt"
    if names_file.exists():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(classes) != 10:
            raise SourceLayoutError(f"stl10: {names_file} should name 10 classes, found {len(classes)}")
    return Source("stl10", classes, splits, _stat_fingerprint(files, root), notes=notes)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def open_tiny_imagenet(src: Path | None) -> Source:
    root = _locate(src, "tiny-imagenet", "tiny-imagenet-200", "wnids.txt")
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    train_paths, train_labels = [], []
    for label, wnid in enumerate(wnids):
        folder = _need(root / "train" / wnid / "images", f"the training images of {wnid}", "tiny-imagenet")
        for p in _image_files(folder):
            train_paths.append(p.relative_to(root))
            train_labels.append(label)
    ann = _need(root / "val" / "val_annotations.txt", "the validation labels", "tiny-imagenet")
    val_dir = _need(root / "val" / "images", "the validation images folder", "tiny-imagenet")
    index = {w: i for i, w in enumerate(wnids)}
    val_paths, val_labels = [], []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise SourceLayoutError(
                f"tiny-imagenet: {ann} line {n}: expected 'FILE<TAB>WNID...' with a wnid from wnids.txt, "
                f"found {line!r}"
            )
        _need(val_dir / fields[0], f"the validation image listed on line {n} of {ann.name}", "tiny-imagenet")
        val_paths.append(Path("val") / "images" / fields[0])
        val_labels.append(index[fields[1]])
    order = np.argsort([str(p) for p in val_paths], kind="stable")
    val_paths = [val_paths[i] for i in order]
    val_labels = [val_labels[i] for i in order]
    descriptions = {}
    if (root / "words.txt").exists():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, words = line.partition("\t")
            descriptions[wnid.strip()] = words.strip()
    files = [root / p for p in train_paths + val_paths]
    fingerprint = _stat_fingerprint([root / "wnids.txt", ann, *files], root)
    return Source(
        "tiny-imagenet",
        wnids,
        {
            "train": FileSplit(root, [str(p) for p in train_paths], train_labels),
            "val": FileSplit(root, [str(p) for p in val_paths], val_labels),
        },
        fingerprint,
        extra={"class_descriptions": [descriptions.get(w, "") for w in wnids]} if descriptions else {},
    )


def open_imagefolder(src: Path | None) -> Source:
    """``ROOT/<split>/<class>/<image>``: every sub-folder of ROOT is a split, classes sorted by name."""
    if src is None:
        raise SourceLayoutError("imagefolder: --src is required (ROOT with ROOT/<split>/<class>/<image>)")
    root = Path(src)
    if not root.is_dir():
        raise SourceLayoutError(f"imagefolder: source folder {root} does not exist or is not a folder")
    split_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not split_dirs:
        raise SourceLayoutError(
            f"imagefolder: expected split folders such as {root / 'train'} "
            "(layout ROOT/<split>/<class>/<image>)"
        )
    per_split: dict[str, dict[str, list[Path]]] = {}
    for split_dir in split_dirs:
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            loose = _image_files(split_dir)
            hint = (
                f"; it holds images directly, so {root} looks like ROOT/<class>/<image>: "
                f"move the class folders under {root / 'train'}"
                if loose
                else ""
            )
            raise SourceLayoutError(
                f"imagefolder: expected class folders in {split_dir} "
                f"(layout ROOT/<split>/<class>/<image>){hint}"
            )
        if not SPLIT_NAME.fullmatch(split_dir.name):
            raise SourceLayoutError(
                f"imagefolder: split folder {split_dir} must be named with letters, digits, '_' or '-' "
                "(the name goes into shard file names and sample keys); rename it"
            )
        per_split[split_dir.name] = {c.name: _image_files(c) for c in class_dirs}
    classes = sorted({c for by_class in per_split.values() for c in by_class})
    label_of = {c: i for i, c in enumerate(classes)}
    splits = {}
    all_files = []
    for split, by_class in per_split.items():
        paths, labels = [], []
        for cls in sorted(by_class):
            for p in by_class[cls]:
                paths.append(str(p.relative_to(root)))
                labels.append(label_of[cls])
        if not paths:
            raise SourceLayoutError(
                f"imagefolder: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root / split}"
            )
        all_files.extend(root / p for p in paths)
        splits[split] = FileSplit(root, paths, labels)
    return Source("imagefolder", classes, splits, _stat_fingerprint(all_files, root))


def digits_arrays(side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16) as (N, side, side, 3) uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(x).resize((side, side), Image.BILINEAR)) for x in small])
    return np.repeat(big[..., None], 3, axis=3), digits.target.astype(np.int64)


def stratified_split(
    labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle puts ``round(test_fraction * n)`` samples in test; indices sorted."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def open_digits(src: Path | None = None) -> Source:
    images, labels = digits_arrays()
    train, test = stratified_split(labels)
    h = hashlib.sha256(images.tobytes())
    h.update(labels.tobytes())
    return Source(
        "digits",
        [str(d) for d in range(10)],
        {
            "train": ArraySplit(images[train], labels[train], "sklearn-digits"),
            "test": ArraySplit(images[test], labels[test], "sklearn-digits"),
        },
        h.hexdigest()[:16],
        extra={"source": "sklearn.datasets.load_digits, 8x8 upscaled to 32x32, 80/20 per class, seed 0"},
    )


OPENERS = {
    "cifar10": open_cifar10,
    "cifar100": open_cifar100,
    "stl10": open_stl10,
    "tiny-imagenet": open_tiny_imagenet,
    "imagefolder": open_imagefolder,
    "digits": open_digits,
}


def open_source(dataset: str, src: str | os.PathLike | None) -> Source:
    """Open and check the source of ``dataset`` (one of :data:`DATASETS`)."""
    if dataset not in OPENERS:
        raise SourceLayoutError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return OPENERS[dataset](None if src is None else Path(src))


def pil_from_pixels(pixels: np.ndarray) -> Image.Image:
    """A Pillow view of an (H, W, 3) uint8 array (no copy when it is contiguous)."""
    pixels = np.ascontiguousarray(pixels)
    h, w, _ = pixels.shape
    return Image.frombuffer("RGB", (w, h), pixels, "raw", "RGB", 0, 1)
