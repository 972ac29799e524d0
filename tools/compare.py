"""A grid of pretraining runs through the real trainer, then the paper's comparison tables.

    python tools/compare.py --config demo --set data.root=shards/digits --methods ensiam,simsiam_kaug \\
        --views 4 --presets default,very_strong --seeds 0,1,2 --out runs/grid
    python tools/compare.py --grid grid.yaml --out runs/grid        # several blocks of axes (below)
    python tools/compare.py --out runs/grid --report-only             # tables from the finished runs

Every run is ``python -m ensiam_fast.train --config CONFIG <set ...> method=.. views=.. data.preset=..
batch_size=.. seed=.. output_dir=OUT/runs/NAME`` followed by ``python -m ensiam_fast.evaluate linear
--run OUT/runs/NAME``: each run directory is a normal run (resume, evaluate, export work on it). The
trainer's kNN monitor gives the curve over training; linear evaluation scores the end.

Resumable. A run is finished when ``OUT/runs/NAME/compare.json`` says ``complete`` (written last, after
the linear evaluation); a rerun skips it. Any other run starts again through the trainer's own resume
(its newest checkpoint). SIGTERM or Ctrl-C is passed on to the run in progress, which checkpoints;
rerunning the same command carries on. A finished run made with other settings than the grid's is
an error (use a new ``--out``), never silently reused.

Grid file (YAML): see tools/compare_grid.py (``config``, ``set``, ``linear``, ``blocks`` of axes).
``simsiam`` is defined with 2 views: it runs at K=2 whatever ``--views`` says.

Writes ``OUT/results.md`` (Table 4: batch size, Table 5: K, Figure 2: augmentation strength, all with
mean +- sample std over seeds and n; images/s per run) and ``OUT/figure3.png``; progress lines, then one
JSON object as the last line. Logs of each command: ``OUT/logs/NAME.{train,linear}.log``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from common import ROOT, last_json  # noqa: E402  (tools/common.py: the checkout first on sys.path)
from compare_grid import AXES, Grid, GridError, RunSpec, grid_from_flags, read_grid_file  # noqa: E402
from compare_report import ReportError, write_report  # noqa: E402
from runlog import read_run  # noqa: E402

from ensiam_fast.rundir import RunDirError, open_append, open_regular, write_text  # noqa: E402

MARKER = "compare.json"


# ---------------------------------------------------------------------------------------------
# running one run: train (resuming), evaluate, then the marker


class Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Runner:
    """Runs the grid's commands (``jobs`` at a time, from worker threads); a signal is passed on,
    once, to every command running, and no new command starts after it."""

    def __init__(self):
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.signum: int | None = None

    def _handler(self, signum, frame):
        with self.lock:
            if self.signum is None:
                for child in self.children:  # once: the trainer checkpoints on its first signal
                    if child.poll() is None:
                        child.send_signal(signal.SIGTERM)
                self.signum = signum

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def command(self, argv: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open_append(log) as f:
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            with self.lock:
                if self.signum is not None:
                    raise Stop(self.signum)
                # Its own process group: a Ctrl-C reaches the grid only, which passes one SIGTERM on.
                child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
                self.children.add(child)
            rc = child.wait()
            with self.lock:
                self.children.discard(child)
        if self.signum is not None:
            raise Stop(self.signum)
        return rc


def _die_with_parent() -> None:
    """The run gets SIGTERM (and checkpoints) if the grid itself is killed with SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: a killed grid leaves its run to finish on its own
        pass


def last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def read_marker(run_dir: Path) -> dict | None:
    try:
        with open_regular(run_dir / MARKER, "r") as f:  # a FIFO planted there is not waited on
            return json.loads(f.read())
    except (OSError, ValueError, RunDirError):
        return None  # absent, torn or not a regular file: the run is not finished


def linear_argv(grid: Grid, run_dir: Path) -> list[str]:
    argv = [sys.executable, "-m", "ensiam_fast.evaluate", "linear", "--run", str(run_dir), "--quiet"]
    for key, value in sorted(grid.linear.items()):
        if key == "precomputed":
            argv += ["--precomputed"] if value else []
        elif isinstance(value, (list, tuple)):  # crop_scale: [0.2, 1.0] -> --crop-scale 0.2,1.0
            argv += [f"--{key.replace('_', '-')}", ",".join(map(str, value))]
        elif value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def run_one(runner: Runner, grid: Grid, spec: RunSpec, out: Path) -> tuple[dict, bool]:
    """(the run's marker record, whether anything ran); raises GridError when a command fails."""
    run_dir = out / "runs" / spec.name
    train_argv = [sys.executable, "-m", "ensiam_fast.train", "--config", grid.config, *grid.set,
                  *spec.overrides(), f"output_dir={run_dir}"]  # fmt: skip
    settings = {"config": grid.config, "set": grid.set, "axes": asdict(spec), "linear": grid.linear}
    marker = read_marker(run_dir)
    if marker and marker.get("complete"):
        if marker.get("settings") != settings:
            raise GridError(
                f"run {run_dir} finished with other settings ({marker.get('settings')}) than this grid's "
                f"({settings}); use a new --out, or delete {run_dir} to run it again"
            )
        return marker, False
    logs = out / "logs"
    start = time.perf_counter()
    rc = runner.command(train_argv, logs / f"{spec.name}.train.log")
    train_s = time.perf_counter() - start
    if rc != 0:
        raise GridError(f"run {spec.name}: training failed (exit {rc}): {last_error(logs / f'{spec.name}.train.log')}")
    summary = last_json((logs / f"{spec.name}.train.log").read_text(errors="replace")) or {}
    start = time.perf_counter()
    rc = runner.command(linear_argv(grid, run_dir), logs / f"{spec.name}.linear.log")
    linear_s = time.perf_counter() - start
    if rc != 0:
        raise GridError(f"run {spec.name}: linear evaluation failed (exit {rc}): "
                        f"{last_error(logs / f'{spec.name}.linear.log')}")  # fmt: skip
    linear = json.loads((run_dir / "linear.json").read_text())
    marker = {"complete": True, "name": spec.name, "settings": settings, "train": summary,
              "linear": linear, "train_s": round(train_s, 1), "linear_s": round(linear_s, 1)}  # fmt: skip
    write_text(
        run_dir / MARKER, json.dumps(marker, indent=2) + "\n"
    )  # written last: its presence means the run is finished
    return marker, True


def say(line: str) -> None:
    print(line, flush=True)


def run_grid(grid: Grid, out: Path, jobs: int = 1) -> dict:
    trained, skipped = [], []
    n = len(grid.runs)

    def one(i: int, spec: RunSpec) -> None:
        if runner.signum is not None:  # stopping: a queued run does not start
            raise Stop(runner.signum)
        run_dir = out / "runs" / spec.name
        if not (read_marker(run_dir) or {}).get("complete"):
            resuming = (run_dir / "checkpoints").is_dir()
            say(f"[{i}/{n}] {spec.name}: {'resuming' if resuming else 'training'}")
        try:
            marker, ran = run_one(runner, grid, spec, out)
        except GridError:
            runner._handler(signal.SIGTERM, None)  # a failed run stops the grid: no further run starts
            raise
        if ran:
            trained.append(spec.name)
            knn = read_run(out / "runs" / spec.name).last("knn_top1")  # also when training had finished earlier
            knn_text = f"kNN top-1 {knn:.2f}%, " if isinstance(knn, (int, float)) else ""
            say(f"[{i}/{n}] {spec.name}: done in {marker['train_s'] + marker['linear_s']:.0f} s: {knn_text}"
                f"linear top-1 {marker['linear']['top1']:.2f}%")  # fmt: skip
        else:
            skipped.append(spec.name)
            say(f"[{i}/{n}] {spec.name}: finished earlier, skipped")

    with Runner() as runner:
        if jobs == 1:
            for i, spec in enumerate(grid.runs, 1):
                one(i, spec)
        else:  # threads only wait on the commands; the first error (or a signal) ends the grid
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(one, i, spec) for i, spec in enumerate(grid.runs, 1)]
                try:
                    for future in futures:
                        future.result()
                except BaseException:
                    runner._handler(signal.SIGTERM, None)  # the runs still going checkpoint and stop
                    for future in futures:
                        future.cancel()
                    wait(futures)
                    raise
    return {"trained": trained, "skipped": skipped}


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="grid folder: runs/, logs/, results.md, figure3.png")
    p.add_argument("--grid", help="a grid file (YAML; see above) instead of the axis flags")
    p.add_argument("--config", default="demo", help="trainer config: a YAML file or a preset name (default demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--methods", help="comma-separated: ensiam,simsiam_kaug,simsiam,fastsiam")
    p.add_argument("--views", help="comma-separated K values")
    p.add_argument("--presets", help="comma-separated augmentation presets: default,strong,very_strong")
    p.add_argument("--batch-sizes", dest="batch_sizes", help="comma-separated global batch sizes")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--linear-epochs", type=int, default=100, help="linear evaluation epochs (default 100)")
    p.add_argument("--linear-batch-size", type=int, help="linear evaluation batch (default: evaluate's 256)")
    p.add_argument("--linear-precomputed", action="store_true", help="linear evaluation on cached features")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--report-only", action="store_true", help="train nothing: tables from the finished runs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    try:
        if args.jobs < 1:
            raise GridError(f"--jobs {args.jobs}: must be at least 1")
        if args.report_only:
            result = {"trained": [], "skipped": []}
        else:
            axis_flags = [f"--{a.replace('_', '-')}" for a in AXES if getattr(args, a) is not None]
            if args.grid and axis_flags:
                raise GridError(f"--grid and {', '.join(axis_flags)} both given: put the axes in the grid file")
            grid = read_grid_file(Path(args.grid)) if args.grid else grid_from_flags(args)
            say(f"grid: {len(grid.runs)} runs into {out}")
            result = run_grid(grid, out, args.jobs)
        report = write_report(out)
    except (GridError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stop as e:
        print(f"stopped by {e}: the run in progress checkpointed; run the same command again to resume",
              file=sys.stderr)  # fmt: skip
        return 128 + e.signum
    print(json.dumps({"out": str(out), **result, **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
