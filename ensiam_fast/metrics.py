"""What a training run records: ``metrics.jsonl`` (``MetricsLog`` writes it, ``read_metrics`` is its one
reader), the per-window loss, throughput and data-wait figures (``Window``), the flat config the
trackers get, and the run directory listing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ensiam_fast.errors import UserError
from ensiam_fast.rundir import TMP_SUFFIX, open_append, open_regular, storage_error, write_text
from ensiam_fast.runlock import LOCK_NAME


class MetricsError(UserError):
    """A ``metrics.jsonl`` line that is neither a JSON object with a ``step`` nor the torn last line."""


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``, in file order: the one reader (curves, resume, tools, benchmarks).

    One rule for a damaged file: the last line, when it is not a complete JSON object, is a line torn
    by a run killed while writing it, and is skipped; any other line that is not a JSON object with a
    ``step`` raises ``MetricsError`` naming the file and line (something other than the trainer wrote
    it). Empty lines are skipped."""
    with open_regular(path, "rb") as f:  # a regular file only: never through a link, never waiting on a FIFO
        lines = f.read().decode(errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # torn by a kill mid-write
            raise MetricsError(f"{path}:{number} is not JSON ({e}); remove or repair that line") from None
        if not isinstance(record, dict) or "step" not in record:
            raise MetricsError(f"{path}:{number} is not a metrics record (a JSON object with a 'step')")
        records.append(record)
    return records


class MetricsLog:
    """``metrics.jsonl``, one JSON object per line, written by the main process only.

    On start the file is cut back to what the checkpoint we resume from covers (nothing when there
    is none), so a crash at any moment never leaves a step logged twice: a training line at the
    resumed step stays, everything later (and a kNN line at that step, which runs again) goes, and
    so does a last line cut short by the crash."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [
                record
                for record in read_metrics(path)  # without a torn last line
                if record["step"] < resume_step or (record["step"] == resume_step and "loss" in record)
            ]
            write_text(path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            try:
                with open_append(self.path) as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full or read-only disk: one line, not a traceback
                raise storage_error(e, str(self.path)) from e


class Window:
    """Throughput and data-wait accounting over the steps since the last log line.

    ``data_wait`` is the fraction of wall time spent waiting for the next batch. Losses are summed
    on the device and read once per log line, so logging adds one sync per window, not per step."""

    def __init__(self):
        self.epoch_sum, self.epoch_n = 0.0, 0
        self._reset()
        self.restart()

    def _reset(self):
        self.wait = 0.0
        self.images = 0
        self.steps = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.start = time.perf_counter()

    def restart(self):
        self.mark = time.perf_counter()

    def data_ready(self):
        now = time.perf_counter()
        self.wait += now - self.mark
        self.mark = now

    def step_done(self, outputs: dict, images: int):
        self.images += images
        self.steps += 1
        for k, v in outputs.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.mark = time.perf_counter()

    def flush(self, accelerator) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        names = sorted(self.sums)
        means = accelerator.reduce(torch.stack([self.sums[k] for k in names]), reduction="mean") / self.steps
        record = {k: float(v) for k, v in zip(names, means.tolist())}
        record["images_per_s"] = self.images / elapsed
        record["data_wait"] = min(1.0, self.wait / elapsed)
        self.epoch_sum += record["loss"] * self.steps
        self.epoch_n += self.steps
        self._reset()
        return record

    def epoch_loss(self) -> float:
        value = self.epoch_sum / max(1, self.epoch_n)
        self.epoch_sum, self.epoch_n = 0.0, 0
        return value


def flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def run_files(out: Path) -> list[str]:
    """The run directory's entries (folders with a trailing /) and its newest checkpoint."""
    files = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in out.iterdir()
        if not p.name.endswith(TMP_SUFFIX) and p.name != LOCK_NAME
    )
    newest = sorted((out / "checkpoints").glob("step-*.pt"))
    return files + [f"checkpoints/{newest[-1].name}"] if newest else files
