"""The tables and the Figure 3 style plot of a ``tools/compare.py`` grid, from its finished runs.

A finished run is ``OUT/runs/NAME`` with a ``compare.json`` marked complete. Runs differing only in
their seed form a setting (method, K, preset, batch); a cell is the mean over its seeds, +- the sample
standard deviation (n-1) when there are two or more, and n. The paper's views:

- Table 4 (batch size): methods x batch sizes at the reference K and preset;
- Table 5 (K): methods x K at the reference preset and batch;
- Figure 2 (augmentation strength): methods x presets at the reference K and batch;
- Figure 3: kNN top-1 against the epoch, one line per method (the mean over seeds, shaded from the
  lowest to the highest seed), one panel per preset, at the reference K (SimSiam at its K=2) and batch.

The reference values are K=4, preset ``default`` and the most common batch size, each when the grid
has it (else the most common value). A table whose axis has one value is left out.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (tools/common.py: the checkout first on sys.path)
from runlog import RunError, read_run

from ensiam_fast.rundir import RunDirError, atomic_write, open_regular, write_text

METHOD_ORDER = ("ensiam", "simsiam_kaug", "simsiam", "fastsiam")
PRESET_ORDER = ("default", "strong", "very_strong")
MISSING = "-"


class ReportError(ValueError):
    """Finished runs that cannot be read; the message names the folder or file."""


@dataclass
class Result:
    name: str
    method: str
    views: int
    preset: str
    batch: int
    seed: int
    linear: float
    knn: float | None
    knn_start: float | None  # the monitor at step 0: the random initialisation's figure
    knn_curve: list[tuple[float, float]]  # (epoch, kNN top-1) of the monitor
    images_per_s: float | None  # median over the training log lines
    epochs: float
    train_s: float
    linear_mode: str

    @property
    def setting(self) -> tuple:
        return (self.method, self.views, self.preset, self.batch)


def read_results(out: Path) -> list[Result]:
    results = []
    for marker_path in sorted((out / "runs").glob("*/compare.json")):
        try:
            with open_regular(marker_path, "r") as f:  # a FIFO there is skipped, never waited on
                marker = json.loads(f.read())
        except (ValueError, RunDirError):
            continue  # torn or not a regular file: not finished
        if not marker.get("complete"):
            continue
        run = read_run(marker_path.parent)
        axes = marker["settings"]["axes"]
        knn = [(float(r["epoch"]), float(r["knn_top1"])) for r in run.knn_records]
        last_step = max((r["step"] for r in run.records), default=0)
        results.append(
            Result(
                name=marker["name"],
                method=axes["method"],
                views=int(axes["views"]),
                preset=axes["preset"],
                batch=int(axes["batch_size"]),
                seed=int(axes["seed"]),
                linear=float(marker["linear"]["top1"]),
                knn=knn[-1][1] if knn else None,
                knn_start=next((float(r["knn_top1"]) for r in run.knn_records if r["step"] == 0), None),
                knn_curve=knn,
                images_per_s=run.median("images_per_s"),
                epochs=last_step / run.steps_per_epoch if run.steps_per_epoch else float("nan"),
                train_s=float(marker.get("train_s", float("nan"))),
                linear_mode=str(marker["linear"].get("mode", "?")),
            )
        )
    return results


def _order(values, preferred=()) -> list:
    first = [v for v in preferred if v in values]
    return first + sorted(v for v in set(values) if v not in first)


def _reference(values: list, preferred) -> object:
    return preferred if preferred in values else Counter(values).most_common(1)[0][0]


def mean_spread(values: list[float]) -> tuple[float, float | None, int]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def cell(values: list[float]) -> str:
    if not values:
        return MISSING
    mean, spread, n = mean_spread(values)
    return f"{mean:.2f} ± {spread:.2f} (n={n})" if spread is not None else f"{mean:.2f} (n=1)"


def references(results: list[Result]) -> dict:
    return {
        "views": _reference([r.views for r in results if r.method != "simsiam"] or [4], 4),
        "preset": _reference([r.preset for r in results], "default"),
        "batch": _reference([r.batch for r in results], Counter(r.batch for r in results).most_common(1)[0][0]),
    }


def _matches(r: Result, ref: dict, free: str) -> bool:
    """Whether ``r`` sits at the reference point on every axis but ``free`` (SimSiam's K is always 2)."""
    views_ok = r.method == "simsiam" or r.views == ref["views"]
    checks = {"views": views_ok, "preset": r.preset == ref["preset"], "batch": r.batch == ref["batch"]}
    return all(ok for axis, ok in checks.items() if axis != free)


def axis_table(results: list[Result], axis: str, title: str, ref: dict, header: str) -> str | None:
    """Methods x the values of ``axis``, with linear and kNN top-1 rows; None when the axis has one value."""
    chosen = [r for r in results if _matches(r, ref, axis)]
    key = {"views": lambda r: r.views, "preset": lambda r: r.preset, "batch": lambda r: r.batch}[axis]
    values = _order([key(r) for r in chosen], PRESET_ORDER if axis == "preset" else ())
    if len(values) < 2:
        return None
    fixed = ", ".join(f"{a}={ref[a]}" for a in ("views", "preset", "batch") if a != axis)
    lines = [f"### {title}", "", f"Top-1 (%) at {fixed} (K is 2 for SimSiam); mean ± std over seeds (n).", ""]
    lines += ["| method | eval | " + " | ".join(f"{header}={v}" for v in values) + " |"]
    lines += ["|---|---|" + "---|" * len(values)]
    for method in _order([r.method for r in chosen], METHOD_ORDER):
        for label, metric in (("linear", lambda r: r.linear), ("kNN", lambda r: r.knn)):
            cells = []
            for v in values:
                got = [metric(r) for r in chosen if r.method == method and key(r) == v and metric(r) is not None]
                cells.append(cell(got))
            lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def settings_table(results: list[Result]) -> str:
    groups = defaultdict(list)
    for r in results:
        groups[r.setting].append(r)
    lines = ["| method | K | preset | batch | seeds | linear top-1 | kNN top-1 | kNN at epoch 0 | images/s | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def order(setting):
        m, k, p, b = setting
        rank = METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
        return (rank, m, k, PRESET_ORDER.index(p) if p in PRESET_ORDER else 9, p, b)

    for setting in sorted(groups, key=order):
        runs = groups[setting]
        speeds = [r.images_per_s for r in runs if r.images_per_s is not None]
        seeds = ",".join(str(r.seed) for r in sorted(runs, key=lambda r: r.seed))
        lines.append(
            f"| {setting[0]} | {setting[1]} | {setting[2]} | {setting[3]} | {seeds} | {cell([r.linear for r in runs])}"
            f" | {cell([r.knn for r in runs if r.knn is not None])}"
            f" | {cell([r.knn_start for r in runs if r.knn_start is not None])} | {cell(speeds) if speeds else MISSING}"
            f" | {statistics.fmean(r.train_s for r in runs):.0f} |"
        )
    return "\n".join(lines) + "\n"


def runs_table(results: list[Result]) -> str:
    lines = ["| run | epochs | kNN top-1 | linear top-1 | linear mode | images/s (median) | train s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(results, key=lambda r: r.name):
        knn = MISSING if r.knn is None else f"{r.knn:.2f}"
        speed = MISSING if r.images_per_s is None else f"{r.images_per_s:.1f}"
        lines.append(
            f"| {r.name} | {r.epochs:g} | {knn} | {r.linear:.2f} | {r.linear_mode} | {speed} | {r.train_s:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_figure3(results: list[Result], ref: dict, path: Path) -> list[str]:
    """kNN top-1 against the epoch per preset; returns the presets drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    chosen = [r for r in results if _matches(r, ref, "preset") and r.knn_curve]
    presets = _order([r.preset for r in chosen], PRESET_ORDER)
    if not presets:
        return []
    fig = Figure(figsize=(5.2 * len(presets), 4.2))
    axes = fig.subplots(1, len(presets), squeeze=False, sharey=True)[0]
    colours = {m: f"C{i}" for i, m in enumerate(METHOD_ORDER)}
    for ax, preset in zip(axes, presets):
        for method in _order([r.method for r in chosen if r.preset == preset], METHOD_ORDER):
            runs = [r for r in chosen if r.preset == preset and r.method == method]
            epochs = sorted(set.intersection(*(set(e for e, _ in r.knn_curve) for r in runs)))
            if not epochs:
                continue
            per_seed = [[dict(r.knn_curve)[e] for e in epochs] for r in runs]
            mean = [statistics.fmean(col) for col in zip(*per_seed)]
            k = 2 if method == "simsiam" else ref["views"]
            label = f"{method} K={k} (n={len(runs)})"
            colour = colours.get(method)
            ax.plot(epochs, mean, marker="o", markersize=3, linewidth=1.5, label=label, color=colour)
            if len(runs) > 1:
                low, high = [min(col) for col in zip(*per_seed)], [max(col) for col in zip(*per_seed)]
                ax.fill_between(epochs, low, high, alpha=0.2, color=colour, linewidth=0)
        ax.set_title(f"preset {preset}, batch {ref['batch']}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("kNN top-1 (%)")
    fig.suptitle("kNN top-1 during pretraining (mean over seeds; band: lowest to highest seed)")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=100, format="png")
    return presets


def write_report(out: Path) -> dict:
    """``OUT/results.md`` and ``OUT/figure3.png`` from the finished runs; what was written."""
    try:
        results = read_results(out)
    except (RunError, KeyError, TypeError, ValueError) as e:
        raise ReportError(f"cannot read the finished runs of {out}: {e}") from None
    if not results:
        raise ReportError(f"no finished runs in {out / 'runs'}: run the grid first (without --report-only)")
    ref = references(results)
    sections = [
        f"## Comparison grid: {len(results)} finished runs",
        "",
        f"Reference point: K={ref['views']}, preset {ref['preset']}, batch {ref['batch']}. Top-1 in %, "
        "mean ± sample std over seeds (n). Linear evaluation mode: "
        + ", ".join(sorted({r.linear_mode for r in results}))
        + ". kNN: the monitor's last value; at epoch 0: the same network at its random initialisation.",
        "",
    ]
    tables = []
    for axis, title, header in (
        ("batch", "Table 4 style: batch size", "batch"),
        ("views", "Table 5 style: number of views K", "K"),
        ("preset", "Figure 2 style: augmentation strength", "preset"),
    ):
        table = axis_table(results, axis, title, ref, header)
        if table:
            tables.append(title)
            sections += [table]
    sections += ["### Every setting (mean over seeds)", "", settings_table(results)]
    sections += ["### Every run", "", runs_table(results)]
    text = "\n".join(sections)
    write_text(out / "results.md", text)
    figure = out / "figure3.png"
    presets = plot_figure3(results, ref, figure)
    summary = [
        {"name": r.name, "linear_top1": r.linear, "knn_top1": r.knn,
         "images_per_s": None if r.images_per_s is None or math.isnan(r.images_per_s) else round(r.images_per_s, 2)}
        for r in results
    ]  # fmt: skip
    return {
        "results": str(out / "results.md"),
        "figure": str(figure) if presets else None,
        "tables": tables,
        "reference": ref,
        "runs": summary,
    }
