"""End-to-end training throughput: the real entry point (``ensiam_fast.train``) on short runs.

    python tools/bench_end_to_end.py                      # demo + cifar10 smoke, DALI vs torchvision loader
    python tools/bench_end_to_end.py --runs cifar10 --steps 40 --cifar-batch 256 --backends dali

Each run trains for ``--steps`` optimizer steps with the kNN monitor off and reads ``metrics.jsonl``:
images/s and ``data_wait`` (the fraction of wall time the loop waited for a batch) are the medians
over the logged windows, leaving out the first (start-up and warm-up). Every configuration runs
with the DALI loader and with the torchvision reference loader side by side in the same process,
so the ratio is meaningful on a shared machine. The cifar10 smoke run uses the ``cifar10`` preset
(ResNet-18, CIFAR stem, K=4) on synthetic CIFAR-like 32x32 JPEG shards. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_pipeline import write_bench_dataset  # noqa: E402

from ensiam_fast import train  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r][1:]  # the first window holds start-up
    if not rows:
        raise SystemExit(f"{out}: too few logged windows; raise --steps")
    return {
        "images_per_s": statistics.median(r["images_per_s"] for r in rows),
        "data_wait": statistics.median(r["data_wait"] for r in rows),
        "windows": len(rows),
    }


def run_one(config: str, backend: str, work: Path, steps: int, extra: list[str]) -> dict:
    out = work / f"{config}-{backend}"
    argv = ["--config", config, f"output_dir={out}", f"max_steps={steps}", "knn_every=0",
            f"log_every={max(1, steps // 6)}", f"data.backend={backend}", *extra]  # fmt: skip
    start = time.perf_counter()
    rc = train.main(argv)
    if rc != 0:
        raise SystemExit(f"training run {config}/{backend} failed with exit code {rc}")
    return {**summarize(out), "wall_s": time.perf_counter() - start}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="demo,cifar10", help="comma list of: demo, cifar10")
    p.add_argument("--backends", default="dali,torch", help="comma list of: dali, torch")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--cifar-batch", type=int, default=64, help="global batch of the cifar10 smoke run")
    p.add_argument("--digits", default=str(ROOT / "shards" / "digits"), help="the converted digits dataset")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        work = Path(tmp)
        plans = {}
        if "demo" in args.runs.split(","):
            if not (Path(args.digits) / "manifest.json").is_file():
                raise SystemExit(f"{args.digits} is not converted: run python tools/make_shards.py --dataset digits")
            plans["demo"] = [f"data.root={args.digits}"]
        if "cifar10" in args.runs.split(","):
            cifar = write_bench_dataset(work / "cifar_like", 32, max(2048, 4 * args.cifar_batch))
            plans["cifar10"] = [f"data.root={cifar}", f"batch_size={args.cifar_batch}"]
        for config, extra in plans.items():
            results[config] = {b: run_one(config, b, work, args.steps, extra) for b in args.backends.split(",")}
            if {"dali", "torch"} <= set(results[config]):
                d, t = results[config]["dali"], results[config]["torch"]
                results[config]["dali_over_torch_images_per_s"] = d["images_per_s"] / t["images_per_s"]
    cores = len(os.sched_getaffinity(0))
    record = {
        "benchmark": "end_to_end",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({cpu_name()}, {cores} cores)",
        "steps": args.steps,
        "cifar_batch": args.cifar_batch,
        "results": results,
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
