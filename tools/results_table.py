"""A Markdown table of runs, like the paper's Table 1.

    python tools/results_table.py runs/* [--out results.md]

Columns: run, dataset, method, K, global batch, epochs trained (of those configured), the last kNN
top-1 of the monitor (or of ``evaluate knn``), the linear top-1 from ``linear.json`` (marked
"features" when it came from ``--precomputed``), and the median of the logged images/s.
Prints the table, then (as every tool) one JSON object as its last line; ``--out`` writes the table
alone to a file.
"""

from __future__ import annotations

import argparse
import json
import sys

import common  # noqa: F401  (tools/common.py: the checkout first on sys.path)
from runlog import Run, read_runs  # noqa: E402

from ensiam_fast.rundir import write_text  # noqa: E402

HEADER = ("run", "dataset", "method", "K", "batch", "epochs", "kNN top-1", "linear top-1", "images/s")
MISSING = "-"


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def epochs_cell(run: Run) -> str:
    configured = run.config.get("epochs", "?")
    steps = [r["step"] for r in run.records]
    if not steps or not run.steps_per_epoch:
        return f"?/{configured}"
    trained = max(steps) / run.steps_per_epoch
    return f"{trained:g}" if trained == configured else f"{trained:.2f}/{configured}"


def knn_top1(run: Run) -> float | None:
    monitor = run.last("knn_top1")
    if run.knn is not None and (monitor is None or run.knn.get("step", -1) >= run.knn_records[-1]["step"]):
        return run.knn.get("top1")
    return monitor


def linear_cell(run: Run) -> str:
    if run.linear is None:
        return MISSING
    cell = _pct(run.linear.get("top1"))
    return f"{cell} (features)" if run.linear.get("mode") == "precomputed" else cell


def row(run: Run) -> list[str]:
    speed = run.median("images_per_s")
    return [
        run.path.name,
        run.dataset(),
        str(run.config.get("method", "?")),
        str(run.config.get("views", "?")),
        str(run.config.get("batch_size", "?")),
        epochs_cell(run),
        _pct(knn_top1(run)),
        linear_cell(run),
        MISSING if speed is None else f"{speed:.0f}",
    ]


def markdown_table(runs: list[Run]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row(r)) + " |" for r in runs]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    runs = read_runs(args.runs)
    if runs is None:
        return 2
    table = markdown_table(runs)
    if args.out:
        write_text(args.out, table)
    print(table, end="")
    print(json.dumps({"out": args.out, "rows": [dict(zip(HEADER, row(r))) for r in runs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
