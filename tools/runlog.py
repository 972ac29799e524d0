"""Read run directories for the analysis tools (plot_metrics.py, results_table.py).

A run directory holds ``config.yaml`` (the resolved TrainConfig), ``metrics.jsonl`` (one JSON per line:
training lines with ``loss``, ``lr``, ``images_per_s`` ..., monitor lines with ``knn_top1``), and after
evaluation ``linear.json`` / ``knn.json``.

Epochs. The ``epoch`` field of a line is the integer epoch in progress, so it cannot place a point
inside an epoch. The trainer always writes a training line at the last batch of an epoch, whose step
is therefore ``(epoch + 1) * steps_per_epoch``; :func:`steps_per_epoch` reads the figure from there
(any completed epoch), and falls back to ``floor(samples / batch_size)`` from the dataset's manifest
(exact for one process) when no epoch completed.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (tools/common.py: the checkout first on sys.path)
import yaml

from ensiam_fast.metrics import MetricsError, read_metrics


class RunError(ValueError):
    """A run directory that cannot be read; the message names the file."""


def steps_per_epoch(records: list[dict], config: dict) -> float | None:
    """Optimizer steps per epoch, from a completed epoch's last training line or from the manifest."""
    train = [r for r in records if "loss" in r and "epoch" in r]
    later = max((r.get("epoch", 0) for r in records), default=0)
    for epoch in sorted({r["epoch"] for r in train}):
        if epoch < later:  # a line of a later epoch exists: this epoch ran to its end
            return max(r["step"] for r in train if r["epoch"] == epoch) / (epoch + 1)
    try:
        from ensiam_fast.shards import read_manifest

        data = config.get("data", {})
        samples = read_manifest(data["root"]).split(data["split"]).num_samples
        return float(samples // int(config["batch_size"])) or None
    except Exception:  # dataset moved or absent: the caller falls back to the integer epochs
        return None


@dataclass
class Run:
    path: Path
    config: dict
    records: list[dict]
    linear: dict | None
    knn: dict | None
    steps_per_epoch: float | None

    @property
    def label(self) -> str:
        return f"{self.config.get('method', '?')} K={self.config.get('views', '?')}"

    @property
    def train_records(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    @property
    def knn_records(self) -> list[dict]:
        return [r for r in self.records if "knn_top1" in r]

    def epoch_of(self, record: dict) -> float:
        """Fractional epoch of a line (the integer epoch when steps per epoch are unknown)."""
        if self.steps_per_epoch:
            return record["step"] / self.steps_per_epoch
        return float(record.get("epoch", 0))

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of every line that logged ``key``."""
        rows = [r for r in self.records if isinstance(r.get(key), (int, float))]
        return [self.epoch_of(r) for r in rows], [float(r[key]) for r in rows]

    def median(self, key: str) -> float | None:
        values = [float(r[key]) for r in self.train_records if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    def last(self, key: str) -> float | None:
        values = [r[key] for r in self.records if isinstance(r.get(key), (int, float))]
        return float(values[-1]) if values else None

    def dataset(self) -> str:
        root = self.config.get("data", {}).get("root", "?")
        try:
            from ensiam_fast.shards import read_manifest

            return read_manifest(root).dataset
        except Exception:  # not on this machine: its folder name says enough
            return Path(root).name


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not JSON ({e})") from e


def read_run(path: str | Path) -> Run:
    path = Path(path)
    config_path, metrics_path = path / "config.yaml", path / "metrics.jsonl"
    for needed in (config_path, metrics_path):
        if not needed.is_file():
            raise RunError(f"{needed} not found: is {path} a run directory written by ensiam_fast/train.py?")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunError(f"{config_path} is not valid YAML ({e})") from e
    try:
        records = read_metrics(metrics_path)
    except MetricsError as e:
        raise RunError(str(e)) from None
    return Run(
        path,
        config,
        records,
        _read_json(path / "linear.json"),
        _read_json(path / "knn.json"),
        steps_per_epoch(records, config),
    )


def read_runs(paths) -> list[Run] | None:
    """The run directories named on a tool's command line; None once the one error line is printed."""
    try:
        return [read_run(p) for p in paths]
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def unique_labels(runs: list[Run]) -> list[str]:
    """Method names for the legend, with the run folder added where two runs share one."""
    labels = [r.label for r in runs]
    return [f"{lab} ({r.path.name})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]
