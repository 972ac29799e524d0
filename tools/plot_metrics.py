"""Plot training curves of one or more runs against epochs (the paper's Figure 3 view).

    python tools/plot_metrics.py runs/ensiam runs/simsiam runs/simsiam_4aug --out curves.png

Four panels: training loss, kNN top-1 accuracy (the monitor), collapse std (the per-dimension std of
the l2-normalised outputs; 1/sqrt(D) means healthy, 0 collapsed) and learning rate, each run
overlaid and named by its method and K. The x axis is the fractional epoch (see tools/runlog.py).
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import common  # noqa: F401  (tools/common.py: the checkout first on sys.path)
import matplotlib.pyplot as plt  # noqa: E402
from runlog import Run, read_runs, unique_labels  # noqa: E402

from ensiam_fast.curves import PANELS  # noqa: E402  (the trainer's curves.png panels, against the epoch here)
from ensiam_fast.rundir import atomic_write  # noqa: E402


def plot_runs(runs: list[Run], out: Path, title: str | None = None) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    labels = unique_labels(runs)
    for ax, (key, name) in zip(axes.flat, PANELS):
        drawn = False
        for run, label in zip(runs, labels):
            x, y = run.series(key)
            if x:
                marker = "o" if key == "knn_top1" else None
                ax.plot(x, y, label=label, marker=marker, markersize=3, linewidth=1.2)
                drawn = True
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, f"{key} not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    exact = all(r.steps_per_epoch for r in runs)
    for ax in axes[1]:
        ax.set_xlabel("epoch" if exact else "epoch (integer: steps per epoch unknown for some runs)")
    handles, names = axes[0, 0].get_legend_handles_labels()
    if not handles:
        handles, names = axes[0, 1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="upper center", ncol=min(4, len(names)), frameon=False)
    if title:
        fig.suptitle(title, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (config.yaml + metrics.jsonl)")
    parser.add_argument("--out", required=True, help="output image (.png, .pdf, .svg)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    runs = read_runs(args.runs)
    if runs is None:
        return 2
    out = plot_runs(runs, Path(args.out), args.title)
    print(
        json.dumps(
            {"out": str(out), "runs": [str(r.path) for r in runs], "steps_per_epoch": [r.steps_per_epoch for r in runs]}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
