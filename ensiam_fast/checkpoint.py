"""Checkpoints: one file per save, written atomically, found again by the step stored inside.

Layout: ``RUN/checkpoints/step-00001234.pt``, a ``torch.save`` dict with ``format``, ``step``,
``epoch``, ``batch_in_epoch`` (the data position), ``config``, ``model`` (the SiameseNet state dict,
unwrapped from DDP and ``torch.compile``), ``optimizer``, ``scaler`` and ``rng``. A file is written
under a temporary name and renamed when complete, so a crash mid-save leaves the previous
checkpoint as the newest complete one. A file that cannot be read is skipped with a warning.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "ensiam_fast-ckpt/1"
REQUIRED = ("format", "step", "epoch", "batch_in_epoch", "config", "model")


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` (which must hold the REQUIRED keys) and prune all but the newest ``keep``."""
    missing = [k for k in REQUIRED if k != "format" and k not in state]
    if missing:
        raise CheckpointError(f"checkpoint state lacks {missing}")
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{state['step']:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint files, oldest first (by the step in the name the writer chose)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("step-*.pt"))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint on the CPU and check that it is one of ours."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, I/O error: all mean "damaged"
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ensiam_fast checkpoint (format {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return state


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint, ordered by the step stored inside; damaged ones are skipped."""
    found = []
    for path in list_checkpoints(run_dir):
        try:
            found.append((read_checkpoint(path), path))
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
    if not found:
        return None
    state, path = max(found, key=lambda sp: sp[0]["step"])
    return path, state


def resolve_checkpoint(run: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None):
    """``--run DIR`` or ``--checkpoint FILE`` to (path, state), with an error that says what to do."""
    if checkpoint is not None:
        return Path(checkpoint), read_checkpoint(checkpoint)
    if run is None:
        raise CheckpointError("give --run DIR or --checkpoint FILE")
    found = latest_checkpoint(run)
    if found is None:
        raise CheckpointError(
            f"run directory {run} has no readable checkpoint in {checkpoint_dir(run)}; "
            "train first (ensiam_fast/train.py) or pass --checkpoint FILE"
        )
    return found


def check_compatible(cfg, state: dict, path: Path) -> None:
    """A checkpoint from a different network or method cannot be resumed into this config."""
    saved = state["config"]
    for key in ("method", "views"):
        if saved.get(key) != getattr(cfg, key):
            raise CheckpointError(
                f"{path} was trained with {key}={saved.get(key)!r} but this config has {key}="
                f"{getattr(cfg, key)!r}; use a new output_dir or the same settings"
            )
    for key in ("backbone", "cifar_stem", "proj_layers", "proj_hidden", "proj_dim", "pred_hidden", "bn_mode"):
        if saved["model"].get(key) != getattr(cfg.model, key):
            raise CheckpointError(
                f"{path} was trained with model.{key}={saved['model'].get(key)!r} but this config has "
                f"{getattr(cfg.model, key)!r}; use a new output_dir or the same settings"
            )
