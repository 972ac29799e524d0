#!/usr/bin/env python
"""End-to-end training throughput: the real entry point (``ensiam_fast.train``) on short runs.

    python tools/bench_end_to_end.py                      # demo + cifar10 smoke, DALI vs torchvision loader
    python tools/bench_end_to_end.py --runs demo --backends dali --background-load 2 --repeats 3
    python tools/bench_end_to_end.py --runs cifar10,imagenet --backends synthetic --steps 60   # on a GPU

Each run trains for ``--steps`` optimizer steps with the kNN monitor off and reads ``metrics.jsonl``:
images/s and ``data_wait`` (the fraction of wall time the loop waited for a batch) are the medians
over the logged windows, leaving out the first (start-up and warm-up). Runs: ``demo`` (the digits
shards), ``cifar10`` (the preset: ResNet-18, CIFAR stem, K=4) and ``imagenet`` (ResNet-50 at 224),
the last two on synthetic CIFAR-like JPEG shards (or, with ``--backends synthetic``, on
device-resident random views: no shards at all). Backends of one configuration run side by side in
the same process, so their ratio is meaningful on a shared machine.

``--background-load N`` measures every run twice per repeat, idle and with N busy-looping
processes started by this script (the demo's "shared CPU" case), alternating idle/loaded so drift
hits both; ``loaded_over_idle`` is the ratio of the medians over repeats. Runs use the thread
governor (``ENSIAM_THREADS=auto``, ``ensiam_fast/runtime.py``); ``--baseline-threads T`` also
measures each case with torch's threads fixed at T (the behaviour before the governor),
interleaved, for ``*_over_baseline`` ratios. Importing ``ensiam_fast`` shortens OpenMP's spin-wait
(``ensiam_fast/runtime.py``); ``GOMP_SPINCOUNT=300000`` in the environment measures libgomp's default.

On CUDA each run also reports its peak allocated memory and its model FLOP utilisation: FLOPs of
one training step counted by ``FlopCounterMode`` on meta tensors, times steps/s, over
``--peak-tflops``. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# isort: off
from common import ROOT, print_result  # tools/common.py: the checkout first on sys.path
import ensiam_fast  # noqa: E402, F401  (before torch: the trainer's OpenMP spin-wait, as users get it)
import torch  # noqa: E402

# isort: on
from ensiam_fast import train  # noqa: E402
from ensiam_fast.config import load_config  # noqa: E402
from ensiam_fast.metrics import read_metrics  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0  # H100/H200 SXM dense bf16 tensor-core peak (NVIDIA data sheets)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(out: Path) -> dict:
    rows = read_metrics(out / "metrics.jsonl")
    rows = [r for r in rows if "images_per_s" in r][1:]  # the first window holds start-up
    if not rows:
        raise SystemExit(f"{out}: too few logged windows; raise --steps")
    return {
        "images_per_s": statistics.median(r["images_per_s"] for r in rows),
        "data_wait": statistics.median(r["data_wait"] for r in rows),
        "windows": len(rows),
    }


def flops_per_image(argv: list[str]) -> float:
    """FLOPs of one training step (forward + backward, K views) per image, counted on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from ensiam_fast.losses import ensiam_loss
    from ensiam_fast.models import build_model

    cfg = load_config(argv[1], argv[2:])
    m = cfg.model
    model = build_model(
        m.backbone,
        cifar_stem=m.cifar_stem,
        proj_layers=m.proj_layers,
        bn_mode="joint",
        proj_hidden=m.proj_hidden,
        proj_dim=m.proj_dim,
        pred_hidden=m.pred_hidden,
    ).to("meta")
    size = cfg.data.image_size or 32
    x = torch.randn(cfg.views, 2, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        z, p = model(x)
        ensiam_loss(p, z).backward()
    return counter.get_total_flops() / 2


@contextlib.contextmanager
def background_load(n: int):
    """``n`` busy-looping Python processes for the duration of the block (ended by their ids)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def fixed_threads(value: str | None):
    """``ENSIAM_THREADS=value`` for the block ("auto": the governor, N: fixed threads)."""
    saved = os.environ.get("ENSIAM_THREADS")
    if value is not None:
        os.environ["ENSIAM_THREADS"] = value
    try:
        yield
    finally:
        os.environ.pop("ENSIAM_THREADS", None)
        if saved is not None:
            os.environ["ENSIAM_THREADS"] = saved
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # the next run starts from the default


def run_one(name: str, argv: list[str], out: Path, args) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rc = train.main([*argv, f"output_dir={out}"])
    if rc != 0:
        raise SystemExit(f"training run {name} failed with exit code {rc}")
    result = {**summarize(out), "wall_s": time.perf_counter() - start}
    if torch.cuda.is_available():
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="demo,cifar10", help="comma list of: demo, cifar10, imagenet")
    p.add_argument("--backends", default="dali,torch", help="comma list of: dali, torch, synthetic")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--cifar-batch", type=int, default=64, help="global batch of the cifar10 run")
    p.add_argument("--imagenet-batch", type=int, default=64, help="global batch of the imagenet run")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run (repeatable), e.g. --set model.compile=true",
    )
    p.add_argument("--repeats", type=int, default=1, help="measurements per run (and per load)")
    for flag, metavar, condition in (  # further conditions each run is measured under, off by default
        ("--background-load", "N", "with N busy background processes (idle and loaded alternate)"),
        ("--baseline-threads", "T", "with torch threads fixed at T (the governor off), interleaved"),
    ):
        p.add_argument(flag, type=int, default=0, metavar=metavar, help=f"also measure each run {condition}")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="for the MFU figure")
    p.add_argument("--digits", default=str(ROOT / "shards" / "digits"), help="the converted digits dataset")
    return p.parse_args(argv)


def plan_runs(args, work: Path) -> dict[str, list[str]]:
    """Run name -> the trainer's argv (without output_dir)."""
    common = ["knn_every=0", f"max_steps={args.steps}", f"log_every={max(1, args.steps // 6)}", *args.set]
    runs, plans = args.runs.split(","), {}
    for backend in args.backends.split(","):
        data = [f"data.backend={backend}"]
        if "demo" in runs:
            if backend != "synthetic" and not (Path(args.digits) / "manifest.json").is_file():
                raise SystemExit(f"{args.digits} is not converted: run python tools/make_shards.py --dataset digits")
            plans[f"demo/{backend}"] = ["--config", "demo", f"data.root={args.digits}", *data]
        for run, preset, batch, size in (
            ("cifar10", "cifar10", args.cifar_batch, 32),
            ("imagenet", "imagenet", args.imagenet_batch, 224),
        ):
            if run not in runs:
                continue
            if backend == "synthetic":
                root = "/nonexistent"  # nothing is read
            else:
                from bench_pipeline import write_bench_dataset

                root = write_bench_dataset(work / f"{run}_like", size, max(256, 4 * batch))
            plans[f"{run}/{backend}"] = [
                "--config",
                preset,
                f"data.root={root}",
                f"batch_size={batch}",
                f"data.synthetic_samples={max(batch, 50_000)}",
                *data,
            ]
    # every run's argv ends with the shared overrides, so --set wins over the plan's own values
    return {name: [*argv, *common] for name, argv in plans.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    results: dict = {}
    loads = [0, args.background_load] if args.background_load else [0]
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        work = Path(tmp)
        plans = plan_runs(args, work)
        for name, run_argv in plans.items():
            modes = ["governed"] + (["baseline"] if args.baseline_threads else [])
            cases = [(load, mode) for load in loads for mode in modes]
            samples: dict[tuple, list[dict]] = {case: [] for case in cases}
            for rep in range(args.repeats):
                for load, mode in cases if rep % 2 == 0 else cases[::-1]:
                    out = work / f"{name.replace('/', '-')}-{load}-{mode}-{rep}"
                    fixed = str(args.baseline_threads) if mode == "baseline" else "auto"
                    with background_load(load), fixed_threads(fixed):
                        samples[load, mode].append(run_one(name, run_argv, out, args))
                    print(
                        f"{name} load={load} {mode} rep={rep}: {samples[load, mode][-1]['images_per_s']:.1f} img/s, "
                        f"data_wait {samples[load, mode][-1]['data_wait']:.2f}",
                        flush=True,
                    )
            entry = {}
            for (load, mode), runs in samples.items():
                key = ("idle" if load == 0 else f"load_{load}") + ("" if mode == "governed" else "_baseline")
                entry[key] = {
                    "images_per_s": statistics.median(r["images_per_s"] for r in runs),
                    "data_wait": statistics.median(r["data_wait"] for r in runs),
                    "images_per_s_all": [r["images_per_s"] for r in runs],
                    **({"peak_mem_mib": max(r["peak_mem_mib"] for r in runs)} if "peak_mem_mib" in runs[0] else {}),
                }
            for suffix in ("", "_baseline") if args.baseline_threads else ("",):
                if args.background_load:
                    entry[f"loaded_over_idle{suffix}"] = (
                        entry[f"load_{args.background_load}{suffix}"]["images_per_s"]
                        / entry[f"idle{suffix}"]["images_per_s"]
                    )
            if args.baseline_threads:
                for key in [k for k in entry if k.endswith("_baseline") and isinstance(entry[k], dict)]:
                    mine = entry[key[: -len("_baseline")]]["images_per_s"]
                    entry[f"{key[: -len('_baseline')]}_over_baseline"] = mine / entry[key]["images_per_s"]
            if torch.cuda.is_available():
                per_image = flops_per_image(run_argv)
                entry["gflops_per_image_step"] = per_image / 1e9
                entry["mfu"] = per_image * entry["idle"]["images_per_s"] / (args.peak_tflops * 1e12)
            results[name] = entry
        for run in ("demo", "cifar10", "imagenet"):
            if f"{run}/dali" in results and f"{run}/torch" in results:
                results[f"{run}/dali_over_torch_images_per_s"] = (
                    results[f"{run}/dali"]["idle"]["images_per_s"] / results[f"{run}/torch"]["idle"]["images_per_s"]
                )
    cores = len(os.sched_getaffinity(0))
    record = {
        "benchmark": "end_to_end",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({cpu_name()}, {cores} cores)",
        "steps": args.steps, "repeats": args.repeats, "background_load": args.background_load,
        "baseline_threads": args.baseline_threads,
        "overrides": args.set, "peak_tflops": args.peak_tflops,
        "loadavg_at_end": os.getloadavg(),
        "results": results,
    }  # fmt: skip
    return print_result(record)


if __name__ == "__main__":
    main()
