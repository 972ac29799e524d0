"""``manifest.json``: the dataset's splits, classes and shard files; reading (checked) and writing.

See ``shards/README.md`` for the fields.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ensiam_fast.shards.format import FORMAT, MANIFEST, ShardFormatError, index_name, write_atomic


@dataclass
class SplitInfo:
    num_samples: int
    shards: list[str]
    labeled: bool
    shard_sizes: list[int] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    # The content verdict: who checked the split's tars, when, the result (see verdict.py); None: never
    check: dict | None = None


@dataclass
class Manifest:
    dataset: str
    classes: list[str]
    splits: dict[str, SplitInfo]
    image_size: list[int] | None = None  # (H, W) when every image has it, else None
    extra: dict = field(default_factory=dict)
    # Samples were written in a permutation seeded with this (None: the order is not ours, e.g. adopted)
    shuffle_seed: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        """One split, or several joined with ``+`` (``train+unlabeled``): their shards in that order, the
        samples of all of them, labelled when every part is (else the loaders yield no labels)."""
        parts = name.split("+")
        for part in parts:
            if part not in self.splits:
                raise ShardFormatError(
                    f"dataset {self.dataset!r} has no split {part!r}; it has: {', '.join(sorted(self.splits))}"
                    + (" (join several with '+', e.g. train+unlabeled)" if len(self.splits) > 1 else "")
                )
        if len(parts) == 1:
            return self.splits[name]
        if len(set(parts)) < len(parts):
            raise ShardFormatError(f"split {name!r} names a split twice; each part may appear once")
        infos = [self.splits[p] for p in parts]
        return SplitInfo(
            num_samples=sum(s.num_samples for s in infos),
            shards=[shard for s in infos for shard in s.shards],
            labeled=all(s.labeled for s in infos),
            # only when every part lists them (an older manifest may not): the loaders count them otherwise
            shard_sizes=[n for s in infos for n in s.shard_sizes] if all(s.shard_sizes for s in infos) else [],
            skipped=[x for s in infos for x in s.skipped],
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "shuffle_seed": self.shuffle_seed,
            "splits": {
                name: {
                    "num_samples": s.num_samples,
                    "shards": list(s.shards),
                    "shard_sizes": list(s.shard_sizes),
                    "labeled": s.labeled,
                    "skipped": list(s.skipped),
                    **({"check": s.check} if s.check is not None else {}),
                }
                for name, s in self.splits.items()
            },
            **({"extra": self.extra} if self.extra else {}),
        }


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically."""
    root = Path(root)
    path = root / MANIFEST
    write_atomic(path, json.dumps(manifest.to_json(), indent=2) + "\n")
    return path


def _is_int(v) -> bool:
    return type(v) is int  # not bool, not "48": a manifest field of another type is refused, never coerced


# each split field: (is it of the right type, what it must be)
_SPLIT_FIELDS = {
    "num_samples": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "shards": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of file names"),
    "labeled": (lambda v: type(v) is bool, "true or false (JSON booleans, not strings)"),
    "shard_sizes": (lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v), "a list of integers"),
    "skipped": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "a list of objects"),
}
_OPTIONAL = {"shard_sizes": [], "skipped": []}


def _read_split(path: Path, name: str, fields) -> SplitInfo:
    """One split of the manifest, every field of its exact JSON type (``"labeled": "false"`` would be
    true in Python: a wrong type is an error naming the field, not a guess)."""
    if not isinstance(fields, dict):
        raise ShardFormatError(f"{path}: split {name!r} must be an object; re-run tools/make_shards.py")
    values = {}
    for key, (ok, kind) in _SPLIT_FIELDS.items():
        if key not in fields and key in _OPTIONAL:
            values[key] = list(_OPTIONAL[key])
            continue
        if key not in fields:
            raise ShardFormatError(f"{path}: split {name!r} lacks the key {key!r}")
        if not ok(fields[key]):
            raise ShardFormatError(
                f"{path}: split {name!r} has a field of the wrong type: {key}={fields[key]!r} must be {kind}; "
                "fix the file or re-run tools/make_shards.py"
            )
        values[key] = fields[key]
    # kept as written (even by hand or by a newer version): verdict.py judges it, and --verify replaces it
    check = fields.get("check")
    return SplitInfo(**values, check=check if isinstance(check, dict) else None if check is None else {"bad": check})


_PARSED: dict[str, tuple[tuple[int, int, int], dict]] = {}  # path -> (its inode, size, mtime; its JSON)


def _parsed(path: Path) -> dict:
    """The JSON of ``path``, parsed once per version of the file in this process (every loader, the
    start checks and each kNN evaluation read the same manifest); a copy, so callers may change it."""
    st = path.stat()
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    key = str(path.resolve())
    if key not in _PARSED or _PARSED[key][0] != stamp:
        try:
            _PARSED[key] = (stamp, json.loads(path.read_bytes()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardFormatError(f"{path} is not valid JSON ({e}); re-run tools/make_shards.py") from e
    return copy.deepcopy(_PARSED[key][1])


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read and check ``root/manifest.json``; errors name the file and say what to do."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ShardFormatError(
            f"dataset directory {root} does not exist; convert a dataset first with "
            f"`python tools/make_shards.py --dataset NAME --src SRC --out {root}`"
        )
    if not path.is_file():
        raise ShardFormatError(
            f"{path} is missing: {root} is not a converted dataset; make one with "
            f"`python tools/make_shards.py --dataset NAME --src SRC --out {root}`"
        )
    raw = _parsed(path)
    for key in ("dataset", "classes", "splits"):
        if key not in raw:
            raise ShardFormatError(f"{path} lacks the key {key!r}; re-run tools/make_shards.py")
    if not isinstance(raw["splits"], dict) or not isinstance(raw["classes"], list):
        raise ShardFormatError(f"{path}: 'splits' must be a mapping and 'classes' a list; re-run tools/make_shards.py")
    size = raw.get("image_size")
    if size is not None and not (
        isinstance(size, list) and len(size) == 2 and all(type(v) is int and v >= 1 for v in size)
    ):  # [0, 0] read as 'no size' by some readers and as a size by others: refused here, for all
        raise ShardFormatError(f"{path}: image_size={size!r} must be [height, width] (integers >= 1) or null")
    splits = {name: _read_split(path, name, fields) for name, fields in raw["splits"].items()}
    return Manifest(
        dataset=raw["dataset"],
        classes=list(raw["classes"]),
        splits=splits,
        image_size=raw.get("image_size"),
        extra=raw.get("extra", {}),
        shuffle_seed=raw.get("shuffle_seed"),
    )


def resolve_inside(root: Path, name: str) -> Path:
    """``root / name`` for a shard name from the manifest, refused unless it stays inside ``root``
    (a downloaded dataset must not make us read, or write an index, anywhere else)."""
    path = Path(root) / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(Path(root).resolve()):
        raise ShardFormatError(
            f"{Path(root) / MANIFEST} lists the shard {name!r}, which is outside the dataset folder {root}; "
            "shard names must be paths inside it: fix the manifest or re-make the dataset"
        )
    return path


def split_files(root: str | os.PathLike, info: SplitInfo) -> tuple[list[str], list[str]]:
    """Absolute tar and index paths of a split, the tars checked to exist inside ``root``."""
    root = Path(root)
    tars, idxs = [], []
    seen: dict[Path, str] = {}
    for name in info.shards:
        tar = resolve_inside(root, name)
        if (first := seen.get(tar.resolve())) is not None:
            raise ShardFormatError(
                f"{root / MANIFEST} lists the shard {name!r} twice in one split ({first!r} is the same file): "
                "its samples would be read twice; list each shard once (or re-make the dataset)"
            )
        seen[tar.resolve()] = name
        if tar.exists() and not tar.is_file():
            raise ShardFormatError(
                f"shard {tar} listed in {root / MANIFEST} is not a regular file (a FIFO, a device or a folder); "
                "shards must be tar files: re-make the dataset"
            )
        if not tar.is_file():
            raise ShardFormatError(
                f"shard {tar} listed in {root / MANIFEST} is missing; re-run tools/make_shards.py "
                f"or check with `python tools/make_shards.py --verify {root}`"
            )
        tars.append(str(tar))
        idxs.append(str(root / index_name(name)))
    return tars, idxs


def shard_paths(root: str | os.PathLike, split: str) -> tuple[list[str], list[str]]:
    """Absolute tar and index paths of one split, checked to exist."""
    return split_files(root, read_manifest(root).split(split))
