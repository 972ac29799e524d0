"""An image folder tree: ``ROOT/<split>/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path

from ensiam_fast.shards.sources.base import (
    IMAGE_EXTENSIONS,
    SPLIT_NAME,
    FileSplit,
    Source,
    SourceLayoutError,
    _image_files,
    _stat_fingerprint,
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
            f"imagefolder: expected split folders such as {root / 'train'} (layout ROOT/<split>/<class>/<image>)"
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
                f"imagefolder: expected class folders in {split_dir} (layout ROOT/<split>/<class>/<image>){hint}"
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
