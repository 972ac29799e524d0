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

LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt", "val_annotations.txt")


def _flat_split_hint(root: Path, split_dir: Path, loose: list[Path]) -> str:
    """What to do with a split of loose images while other splits have class folders (ImageNet's
    raw ``val/``, labelled by a file beside it)."""
    for name in LABEL_FILES:
        for folder in (split_dir, root, root.parent):
            if (folder / name).is_file():
                label_file = (folder / name).resolve()
                break
        else:
            continue
        if name == "LOC_val_solution.csv":  # ImageId,PredictionString ("n01751748 x y x y ...")
            return (
                f"; it holds {len(loose)} images directly and {label_file} labels them (ImageNet's raw layout): "
                f"arrange them into class folders with: cd {split_dir} && tail -n +2 {label_file} | "
                'while IFS=, read -r id pred; do d=${pred%% *}; mkdir -p "$d" && mv "$id.JPEG" "$d/"; done'
            )
        return (
            f"; it holds {len(loose)} images directly and {label_file} may label them: move each image into "
            f"{split_dir}/<class>/ (the class folder names of the other splits)"
        )
    return f"; it holds {len(loose)} images directly: move them into {split_dir}/<class>/ folders, or remove it"


def open_imagefolder(src: Path | None, strict: bool = False) -> Source:
    """``ROOT/<split>/<class>/<image>``: every sub-folder of ROOT is a split, classes sorted by name.
    A class folder without images is a note (an error with ``strict``)."""
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
    has_classes = {d: any(p.is_dir() and not p.name.startswith(".") for p in d.iterdir()) for d in split_dirs}
    for split_dir in split_dirs:
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            loose = _image_files(split_dir)
            hint = ""
            if loose and any(has_classes.values()):
                hint = _flat_split_hint(root, split_dir, loose)
            elif loose:
                hint = (
                    f"; it holds images directly, so {root} looks like ROOT/<class>/<image>: "
                    f"move the class folders under {root / 'train'}"
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
    notes = []
    for split, by_class in per_split.items():
        empty = [c for c, files in by_class.items() if not files]
        if empty:
            what = (
                f"{len(empty)} class folder(s) of {root / split} hold no images ({', '.join(empty[:5])}"
                f"{' ...' if len(empty) > 5 else ''}; images: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
            if strict:
                raise SourceLayoutError(f"imagefolder: {what} (--strict)")
            notes.append(f"warning: {what}: their classes get no sample there")
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
    return Source("imagefolder", classes, splits, _stat_fingerprint(all_files, root), notes=notes)
