"""``curves.png``: a run's training curves against the optimizer step, drawn from its ``metrics.jsonl``.

Four panels: training loss, kNN top-1 (the monitor, the paper's Figure 3), collapse std (the
per-dimension std of the l2-normalised projections: about 1/sqrt(D) when healthy, 0 when collapsed)
and the learning rate. The trainer writes it at the end of every run; ``tools/plot_metrics.py``
overlays several runs against the epoch.
"""

from __future__ import annotations

import os
from pathlib import Path

from ensiam_fast.metrics import read_metrics
from ensiam_fast.rundir import atomic_write

PANELS = (
    ("loss", "training loss"),
    ("knn_top1", "kNN top-1 (%)"),
    ("collapse_std", "collapse std"),
    ("lr", "learning rate"),
)


def write_curves(run_dir: str | os.PathLike, title: str | None = None) -> Path:
    """Draw ``RUN/metrics.jsonl`` into ``RUN/curves.png`` (written to a temporary name, then renamed)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (key, name) in zip(axes.flat, PANELS):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key == "knn_top1" else None, markersize=3, linewidth=1.2)
        else:
            ax.text(0.5, 0.5, f"{key} not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title or run_dir.name)
    fig.tight_layout()
    out = run_dir / "curves.png"
    with atomic_write(out) as f:
        fig.savefig(f, dpi=110, format="png")
    return out
