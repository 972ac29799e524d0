"""One rule for where datasets are, from any working directory.

The project folder is the one that holds the ``ensiam_fast`` package (the repository of a checkout).
``tools/make_shards.py --dataset digits`` writes to ``PROJECT/shards/digits`` by default, and a relative
``data.root`` (or ``evaluate --data``) is looked up in the working directory first, then in the
project folder: so ``shards/digits`` names the demo's data from wherever the trainer starts.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARDS = PROJECT_ROOT / "shards"


def resolve_data_root(root: str | os.PathLike) -> str:
    """An absolute path where the dataset is found; ``root`` unchanged when it is found nowhere (the
    error then names the path as the user gave it)."""
    path = Path(root).expanduser()
    if path.is_absolute():
        return str(path)
    for base in (Path.cwd(), PROJECT_ROOT):
        if (base / path).exists():
            return str((base / path).resolve())
    return str(root)
