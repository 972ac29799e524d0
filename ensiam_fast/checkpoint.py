"""Checkpoints: one file per save, written atomically, opened only as data.

Layout: ``RUN/checkpoints/step-00001234.pt``, a ``torch.save`` dict with ``format``, ``step``,
``epoch``, ``batch_in_epoch`` (the data position), ``num_processes``, ``config``, ``model`` (the
SiameseNet state dict, unwrapped from DDP and ``torch.compile``), ``optimizer``, ``scaler`` and
``rng``, all tensors and plain types, so files load with ``torch.load(weights_only=True)``: opening
a planted file cannot run code. A file is written under a temporary name and renamed when
complete (``ensiam_fast.rundir.atomic_write``), so a crash mid-save leaves the previous checkpoint as
the newest complete one (a half-written temporary is removed by the next save). Files are opened only
when they are regular files: a FIFO or a link named like a checkpoint is skipped with a
warning. Discovery opens files newest first and stops
at the first that loads (when none does, that is an error); pruning keeps the newest files that load.
Format /1 files (the RNG states as numpy arrays) load too, upgraded in memory. ``check_compatible`` decides
whether a checkpoint can be resumed under a config."""

from __future__ import annotations

import contextlib
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensiam_fast.errors import UserError
from ensiam_fast.rundir import (
    RunDirError,
    StorageError,
    atomic_write,
    check_target,
    is_regular,
    open_regular,
    remove_stale_tmp,
    storage_error,
)

FORMAT = "ensiam_fast-ckpt/2"  # /2: everything stored as tensors and plain types (loads with weights_only)
# /1 (before 2026-12): the same keys, but the numpy and Python RNG states as numpy arrays and tuples
FORMAT_1 = "ensiam_fast-ckpt/1"
REQUIRED = ("format", "step", "epoch", "batch_in_epoch", "config", "model")
NAME = re.compile(r"step-(\d{8,})\.pt")


class CheckpointError(UserError):
    """A checkpoint that cannot be read, resumed or written; the message says which and what to do."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain types, so the file loads with ``weights_only``."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` (which must hold the REQUIRED keys), then prune to the newest ``keep`` valid ones."""
    missing = [k for k in REQUIRED if k != "format" and k not in state]
    if missing:
        raise CheckpointError(f"checkpoint state lacks {missing}")
    folder = checkpoint_dir(run_dir)
    what = f"checkpoint step {state['step']} to {run_dir}"
    if not folder.is_dir():
        check_target(folder)  # a link or FIFO named checkpoints: refused, not followed
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, what) from e
    remove_stale_tmp(folder)
    path = folder / f"step-{state['step']:08d}.pt"
    try:
        with atomic_write(path, what=what) as f:
            torch.save({"format": FORMAT, **state}, f)
    except StorageError as e:
        done = [int(m.group(1)) for p in list_checkpoints(run_dir) if (m := NAME.fullmatch(p.name))]
        newest = f"the newest complete checkpoint is step {done[-1]}" if done else "no checkpoint was completed yet"
        raise StorageError(f"{e}; {newest}", e.errno) from e
    prune(run_dir, keep)
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files, oldest first by the step in the name the writer gave them."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs (format /1's numpy RNG state), under numpy 1's and 2's
    module names: building an array from its bytes, its dtype, nothing that runs other code."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [np.ndarray, np.dtype, reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), type(np.dtype(np.uint32))]  # fmt: skip


def upgrade_format_1(state: dict[str, Any]) -> dict[str, Any]:
    """A format /1 state as /2 holds it (the RNG states as tensors and plain types); nothing else differs."""
    rng = dict(state.get("rng") or {})
    if "python" in rng:
        version, words, gauss = rng["python"]
        rng["python"] = [version, list(words), gauss]
    if "numpy" in rng:
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss),
                        float(cached)]  # fmt: skip
    return {**state, "rng": rng, "format": FORMAT}


def read_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Load one checkpoint on the CPU and check that it is one of ours.

    ``weights_only=True``: the file can hold only tensors, plain containers and plain numpy arrays,
    so a planted or tampered file cannot run code when it is opened. ``mmap=True`` maps the tensors
    instead of reading them (a cheap validity check). Format /1 files are read and upgraded."""
    try:
        if mmap:  # torch maps by name: a regular file checked just before (a FIFO is never opened)
            if not is_regular(path):
                raise RunDirError(f"{path} is not a regular file")
            source = contextlib.nullcontext(path)
        else:
            source = open_regular(path)
        with source as f, torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad pickle, forbidden global, I/O error: all mean "unusable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first}") from e
    if isinstance(state, dict) and state.get("format") == FORMAT_1:
        state = upgrade_format_1(state)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not an ensiam_fast checkpoint of format {FORMAT!r} (found {found!r})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    m = NAME.fullmatch(Path(path).name)
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointError(f"{path} holds step {state['step']}, not the step its name says")
    return state


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads: files are opened newest first, one at a time, until one
    does; the ones that do not are skipped with a warning. None when there is no checkpoint file.

    When there are files but none loads, that is an error, not "no checkpoint": a trainer would
    otherwise start again at step 0 and its first save would prune the files away."""
    paths, skipped = list_checkpoints(run_dir), []
    for path in reversed(paths):
        try:
            state = read_checkpoint(path)
        except CheckpointError as e:
            skipped.append(e)
            continue
        for e in skipped:
            warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
        return path, state
    if paths:
        raise CheckpointError(
            f"none of the {len(paths)} checkpoint file(s) in {checkpoint_dir(run_dir)} can be read (the newest: "
            f"{skipped[0]}); nothing was changed. To start again from step 0, move that folder away or use a "
            "new output_dir; to resume, restore a readable checkpoint there"
        )
    return None


def is_valid(path: Path) -> bool:
    try:
        read_checkpoint(path, mmap=True)
        return True
    except CheckpointError:
        return False


def prune(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Keep the newest ``keep`` checkpoints that load; delete older ones, valid or not. A damaged
    file never counts towards ``keep``, so it cannot push a good checkpoint out."""
    kept, removed = 0, []
    for path in reversed(list_checkpoints(run_dir)):
        if kept < keep:
            kept += is_valid(path)
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def resolve_checkpoint(run: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None):
    """``--run DIR`` or ``--checkpoint FILE`` to (path, state), with an error that says what to do."""
    if checkpoint is not None:
        return Path(checkpoint), read_checkpoint(checkpoint)
    if run is None:
        raise CheckpointError("give --run DIR or --checkpoint FILE")
    if not Path(run).is_dir():
        raise CheckpointError(f"run directory {run} does not exist; give the output_dir of a training run")
    found = latest_checkpoint(run)
    if found is None:
        raise CheckpointError(
            f"run directory {run} has no readable checkpoint in {checkpoint_dir(run)}; "
            "train first (ensiam_fast/train.py) or pass --checkpoint FILE"
        )
    return found


def check_compatible(cfg, state: dict, path: Path, num_processes: int) -> None:
    """Refuse to resume a checkpoint under a config that would reinterpret it.

    A different network or method cannot load the weights. A different global ``batch_size``,
    ``gradient_accumulation_steps`` or number of processes would silently change what the stored
    data position (``batch_in_epoch``, counted in per-process loader batches of one shard each) and
    the step-based schedule mean."""
    saved = state["config"]
    where = "; use a new output_dir or the same settings"
    for key in ("method", "views"):
        if saved.get(key) != getattr(cfg, key):
            raise CheckpointError(
                f"{path} was trained with {key}={saved.get(key)!r} but this config has {key}="
                f"{getattr(cfg, key)!r}{where}"
            )
    for key in ("backbone", "cifar_stem", "proj_layers", "proj_hidden", "proj_dim", "pred_hidden", "bn_mode"):
        if saved["model"].get(key) != getattr(cfg.model, key):
            raise CheckpointError(
                f"{path} was trained with model.{key}={saved['model'].get(key)!r} but this config has "
                f"{getattr(cfg.model, key)!r}{where}"
            )
    if saved.get("batch_size") != cfg.batch_size:
        raise CheckpointError(
            f"{path} was trained with batch_size={saved.get('batch_size')} but this config has "
            f"batch_size={cfg.batch_size}: the saved data position and lr schedule count steps of that "
            f"batch; resume with batch_size={saved.get('batch_size')} or use a new output_dir"
        )
    saved_accum = saved.get("gradient_accumulation_steps", 1)
    if saved_accum != getattr(cfg, "gradient_accumulation_steps", 1):
        raise CheckpointError(
            f"{path} was trained with gradient_accumulation_steps={saved_accum} but this config has "
            f"{cfg.gradient_accumulation_steps}: the saved data position counts loader batches of that size; "
            f"resume with gradient_accumulation_steps={saved_accum} or use a new output_dir"
        )
    saved_procs = state.get("num_processes", 1)
    if saved_procs != num_processes:
        raise CheckpointError(
            f"{path} was written by {saved_procs} process(es) but this launch has {num_processes}: "
            f"the saved data position is per process shard; resume with {saved_procs} process(es) "
            "or use a new output_dir"
        )


# ---------------------------------------------------------------------------------------------
# the resume fingerprint: every setting that changes what is computed


def fingerprint(cfg, data_identity: dict, num_processes: int, mixed_precision: str) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint, as ``key -> value`` (config keys,
    dotted, plus ``num_processes`` and the data's identity: the manifest's dataset name, split, sample
    count and content hash, not its path, so a moved dataset resumes). Not in it: ``max_steps`` (it
    caps the run; the schedule spans ``epochs``), logging, checkpointing, the kNN monitor, threads, and
    ``views_per_pass``, ``memory_budget_gb``, ``model.grad_checkpointing`` (the same gradients: docs/scale.md)."""
    m, o, d = cfg.model, cfg.optim, cfg.data
    found = {
        "method": cfg.method, "views": cfg.views, "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "num_processes": num_processes,
        "epochs": cfg.epochs, "seed": cfg.seed, "mixed_precision": mixed_precision,
        **{f"model.{k}": getattr(m, k) for k in ("backbone", "cifar_stem", "pretrained", "proj_layers", "proj_hidden",
                                                 "proj_dim", "pred_hidden", "bn_mode", "sync_bn")},
        **{f"optim.{k}": getattr(o, k)
           for k in ("base_lr", "momentum", "weight_decay", "warmup_epochs", "fix_pred_lr")},
        "data.preset": d.preset, "data.preset_overrides": dict(sorted(d.preset_overrides.items())),
        "data.image_size": d.image_size, "data.backend": d.backend,
        **{f"data.{k}": v for k, v in data_identity.items()},
    }  # fmt: skip
    return found


def check_fingerprint(saved: dict | None, current: dict, allow: list[str], path: Path) -> list[str]:
    """Refuse a resume whose settings differ from the checkpoint's (one line naming each changed key,
    old -> new, and what to do); the keys in ``allow`` (``resume.allow_changes``) may differ. Returns
    the notes to print (the changes allowed, or a checkpoint written before fingerprints)."""
    from ensiam_fast.config_checks import RESUMABLE_CHANGES

    if saved is None:
        return [f"note: {path} has no settings fingerprint (written before 2026-12): only the network, method, "
                "batch and processes were compared; make sure the other settings are the run's"]  # fmt: skip
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    changed.update({k: (v, None) for k, v in saved.items() if k not in current})
    refused = {k: c for k, c in changed.items() if k not in allow}
    if refused:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        safe = [k for k in refused if k in RESUMABLE_CHANGES]
        how = f"to continue on purpose with the new value, add resume.allow_changes=[{','.join(safe)}]" if safe else ""
        fixed = [k for k in refused if k not in RESUMABLE_CHANGES]
        if fixed:
            how += ("; " if how else "") + f"{', '.join(fixed)} cannot change within a run"
        raise CheckpointError(
            f"{path} was trained with other settings: {listed}; nothing was written. Resume with the run's settings "
            f"(its config.yaml), start a new run with another output_dir, or {how}"
        )
    return [f"note: resuming with {k} changed on purpose ({old!r} -> {new!r})" for k, (old, new) in changed.items()]
