#!/usr/bin/env python
"""The one command for a lent GPU machine: every device figure this project needs, in one run.

    PYTHONPATH=. bash tools/gpu_suite.sh                 # on the GPU machine (under 8 minutes)
    PYTHONPATH=. bash tools/gpu_suite.sh --dry-run       # every step tiny, on the CPU (CI runs this)

Steps, in order of importance (each a subprocess with its own time limit, so one failure or
overrun costs only its own figures; steps that no longer fit ``--budget`` are skipped):

1. ``tests``: the CUDA tests (per-view BatchNorm on the device, the fused forward) and the suites
   that need neither DALI nor webdataset.
2. ``e2e_r18_b256`` / ``e2e_r18_b1024`` / ``e2e_r50_224``: the real trainer with
   ``data.backend=synthetic`` (device-resident random views): ResNet-18 CIFAR K=4 at batch 256 and
   1024, ResNet-50 at 224 (the imagenet preset): images/s, data-wait, peak memory, MFU.
3. ``train_step_eager``: ``tools/bench_train.py`` on CUDA, K in 2, 4, 8, fused against a loop over
   views against joint BatchNorm, fp32 and bf16, NCHW and channels_last, plus one BatchNorm layer
   (per-view, the previous concatenating layer, joint).
4. ``train_step_compiled``: the same with ``torch.compile`` (K=4, bf16, channels_last) and the
   compiled BatchNorm layer.
5. ``memory_views``: ``tools/bench_memory.py`` at Tiny-ImageNet's size (64x64, batch 256, K 4, 8, 16):
   peak memory and step time fused, one view per pass and K/2, with and without grad checkpointing.
6. ``dali_gpu``: the DALI GPU pipeline (``tools/bench_pipeline.py --device gpu``), only when
   ``nvidia.dali`` imports.

Writes ``gpu_suite.json`` (every step's full JSON) and ``gpu_suite.md`` (the headline table) under
``$OUT`` (or ``--out``) when set; the last line printed is one JSON object with the headline figures.
Nothing here imports DALI or webdataset itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, last_json  # tools/common.py: the checkout first on sys.path

from ensiam_fast.rundir import write_text  # the one writer

PY = sys.executable
TINY_MODEL = ["--set", "model.proj_hidden=32", "--set", "model.proj_dim=32", "--set", "model.pred_hidden=8"]


def steps(dry: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds); ``dry`` makes every one tiny and CPU-only."""
    tests = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    bench, e2e = str(ROOT / "tools" / "bench_train.py"), str(ROOT / "tools" / "bench_end_to_end.py")
    if dry:
        train_tiny = ["--device", "cpu", "--batch", "2", "--size", "8", "--views", "2", "--steps", "1",
                      "--warmup", "0", "--heads", "tiny", "--impls", "fused", "loop", "joint",
                      "--precisions", "fp32", "--formats", "channels_last"]  # fmt: skip
        e2e_tiny = ["--backends", "synthetic", "--steps", "2", "--set", "data.image_size=8",
                    "--set", "mixed_precision=no", "--set", "log_every=1", *TINY_MODEL]  # fmt: skip
        return [
            ("tests", [PY, *tests, "tests/test_batchnorm.py", "-k", "equals_separate_forwards and nchw"], 300),
            ("e2e_r18_b256", [PY, e2e, "--runs", "cifar10", "--cifar-batch", "4", *e2e_tiny], 300),
            ("e2e_r18_b1024", [PY, e2e, "--runs", "cifar10", "--cifar-batch", "8", *e2e_tiny], 300),
            ("e2e_r50_224", [PY, e2e, "--runs", "imagenet", "--imagenet-batch", "2", *e2e_tiny], 300),
            ("train_step_eager", [PY, bench, *train_tiny, "--bn-layer"], 300),
            ("train_step_compiled", [PY, bench, *train_tiny, "--bn-layer-only"], 300),
            (
                "cuda_stages",
                [
                    PY,
                    str(ROOT / "tools" / "bench_cuda_stages.py"),
                    "--simulate",
                    "--size",
                    "8",
                    "--threads",
                    "4",
                    "--repeats",
                    "0",
                    "--stages",
                    "colour",
                    "randaugment_jigsaw",
                ],
                300,
            ),  # fmt: skip
            (
                "memory_views",
                [
                    PY,
                    str(ROOT / "tools" / "bench_memory.py"),
                    "--backbone",
                    "test_resnet",
                    "--size",
                    "8",
                    "--batch",
                    "2",
                    "--views",
                    "2",
                    "--settings",
                    "fused",
                    "1",
                    "nockpt",
                    "ckpt",
                    "--cpu-steps",
                    "1",
                ],
                300,
            ),
        ]
    train = [PY, bench, "--device", "cuda", "--batch", "256", "--impls", "fused", "loop", "joint",
             "--steps", "10", "--warmup", "3"]  # fmt: skip
    e2e_gpu = ["--backends", "synthetic"]
    plan = [
        (
            "tests",
            [
                PY,
                *tests,
                "tests/test_batchnorm.py",
                "tests/test_models.py",
                "tests/test_losses.py",
                "tests/test_synthetic.py",
            ],
            100,
        ),  # fmt: skip
        ("e2e_r18_b256", [PY, e2e, "--runs", "cifar10", "--cifar-batch", "256", "--steps", "120", *e2e_gpu], 60),
        ("e2e_r18_b1024", [PY, e2e, "--runs", "cifar10", "--cifar-batch", "1024", "--steps", "60", *e2e_gpu], 60),
        ("e2e_r50_224", [PY, e2e, "--runs", "imagenet", "--imagenet-batch", "256", "--steps", "30", *e2e_gpu], 75),
        (
            "train_step_eager",
            [
                *train,
                "--views",
                "2",
                "4",
                "8",
                "--precisions",
                "fp32",
                "bf16",
                "--formats",
                "nchw",
                "channels_last",
                "--bn-layer",
            ],
            75,
        ),  # fmt: skip
        (
            "train_step_compiled",
            [*train, "--views", "4", "--precisions", "bf16", "--formats", "channels_last", "--compile", "--bn-layer"],
            120,
        ),  # fmt: skip
    ]
    # views_per_pass and grad checkpointing at Tiny-ImageNet's size: peak memory and step time (fused K=16
    # is 4,096 images in one pass; a setting that runs out of memory is reported as such)
    plan.append(("memory_views", [PY, str(ROOT / "tools" / "bench_memory.py"), "--device", "cuda", "--size", "64",
                                  "--batch", "256", "--views", "4", "8", "16", "--settings", "fused", "1", "half",
                                  "nockpt", "ckpt", "--precision", "bf16", "--channels-last"], 150))  # fmt: skip
    # the GPU graph's CUDA stages against the CPU kernels: bit for bit at 32x32, then timed on 1,024 views of
    # 224x224 (batch 256 x K=4), DALI not needed
    plan.append(("cuda_stages", [PY, str(ROOT / "tools" / "bench_cuda_stages.py"), "--size", "32", "--repeats", "20",
                                 "--views", "1024", "--time-size", "224"], 90))  # fmt: skip
    if importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None:
        plan.append(("dali_gpu", [PY, str(ROOT / "tools" / "bench_pipeline.py"), "--device", "gpu", "--quick"], 60))
    return plan


def run_step(name: str, cmd: list[str], limit: float, log_dir: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit:.0f} s"
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    wall = time.perf_counter() - start
    if log_dir is not None:
        write_text(log_dir / f"{name}.log", f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
    result = {"status": status, "wall_s": round(wall, 1), "result": last_json(stdout)}
    if status != "ok":
        result["stderr_tail"] = stderr[-1500:]
    if name == "tests":
        result["summary"] = (stdout.strip().splitlines() or [""])[-1]
    print(f"[{name}] {status} in {wall:.0f} s", flush=True)
    return result


def headline(report: dict) -> dict:
    """The figures the issue asks for, pulled out of the steps' JSON."""
    head: dict = {"device": report["device"], "dry_run": report["dry_run"]}
    for name in ("e2e_r18_b256", "e2e_r18_b1024", "e2e_r50_224"):
        res = (report["steps"].get(name) or {}).get("result") or {}
        for run, entry in (res.get("results") or {}).items():
            if isinstance(entry, dict) and "idle" in entry:
                head[name] = {
                    "run": run,
                    "images_per_s": entry["idle"]["images_per_s"],
                    "data_wait": entry["idle"]["data_wait"],
                    "peak_mem_mib": entry["idle"].get("peak_mem_mib"),
                    "mfu": entry.get("mfu"),
                }
    for name in ("train_step_eager", "train_step_compiled"):
        res = (report["steps"].get(name) or {}).get("result") or {}
        rows = []
        for r in res.get("results") or []:
            rows.append(
                {
                    "K": r["views"],
                    "precision": r["precision"],
                    "channels_last": r["channels_last"],
                    "compile": r["compile"],
                    **{f"{impl}_images_per_s": r[impl]["images_per_s"] for impl in res.get("impls", [])},
                    "fused_over_loop": r.get("fused_over_loop_speed"),
                    "per_view_over_joint": r.get("per_view_over_joint_speed"),
                }
            )
        if rows:
            head[name] = rows
        layers = res.get("bn_layer") or []
        if layers:
            head[f"{name}_bn_layer_ms"] = [
                {"format": b["format"], "precision": b["precision"], **b["median_ms"]} for b in layers
            ]
    res = (report["steps"].get("memory_views") or {}).get("result") or {}
    if res.get("results"):
        head["memory_views"] = res["results"]
    res = (report["steps"].get("cuda_stages") or {}).get("result") or {}
    if res:
        head["cuda_stages"] = {"bit_exact": res.get("bit_exact"), "timing": res.get("timing")}
    head["status"] = {name: step["status"] for name, step in report["steps"].items()}
    return head


def markdown(head: dict) -> str:
    lines = [f"# GPU suite on {head['device']}{' (dry run, CPU)' if head['dry_run'] else ''}", ""]
    lines += ["| step | status |", "|---|---|"] + [f"| {k} | {v} |" for k, v in head["status"].items()] + [""]
    e2e = [n for n in ("e2e_r18_b256", "e2e_r18_b1024", "e2e_r50_224") if n in head]
    if e2e:
        lines += [
            "| trainer (synthetic data) | images/s | data-wait | peak memory MiB | MFU |",
            "|---|---|---|---|---|",
        ]
        for n in e2e:
            h = head[n]
            mem = f"{h['peak_mem_mib']:.0f}" if h.get("peak_mem_mib") is not None else "-"
            mfu = f"{h['mfu']:.3f}" if h.get("mfu") is not None else "-"
            lines.append(f"| {n} | {h['images_per_s']:.0f} | {h['data_wait']:.3f} | {mem} | {mfu} |")
        lines.append("")
    for n in ("train_step_eager", "train_step_compiled"):
        if n not in head:
            continue
        lines += [
            f"| {n}: K | precision | channels_last | compile | fused img/s | loop img/s | joint img/s "
            "| fused/loop | per-view/joint |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in head[n]:

            def fmt(v, spec=".0f"):
                return format(v, spec) if isinstance(v, (int, float)) else "-"

            lines.append(
                f"| {r['K']} | {r['precision']} | {r['channels_last']} | {r['compile']} "
                f"| {fmt(r.get('fused_images_per_s'))} | {fmt(r.get('loop_images_per_s'))} "
                f"| {fmt(r.get('joint_images_per_s'))} | {fmt(r['fused_over_loop'], '.3f')} "
                f"| {fmt(r['per_view_over_joint'], '.3f')} |"
            )
        lines.append("")
        for b in head.get(f"{n}_bn_layer_ms", []):
            lines.append(
                f"BatchNorm layer {b['format']} {b['precision']} (ms fwd+bwd): "
                + ", ".join(f"{k} {v:.3f}" for k, v in b.items() if isinstance(v, float))
            )
        lines.append("")
    if head.get("memory_views"):
        lines += ["| K | views_per_pass | grad_checkpointing | peak MB | step s |", "|---|---|---|---|---|"]
        for r in head["memory_views"]:
            peak = "out of memory" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
            step = "-" if r.get("step_s") is None else f"{r['step_s']:.3f}"
            lines.append(f"| {r['views']} | {r['views_per_pass']} | {r['grad_checkpointing']} | {peak} | {step} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every step tiny on the CPU (for CI)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_suite.json/.md (default: $OUT)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all steps together")
    ap.add_argument("--only", nargs="+", default=None, help="run only these steps")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None:
        (out / "logs").mkdir(parents=True, exist_ok=True)
    import torch  # here: the steps run in their own processes

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    report: dict = {
        "suite": "gpu_suite",
        "device": device,
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "steps": {},
    }
    deadline = time.perf_counter() + (1e9 if args.dry_run else args.budget)
    for name, cmd, limit in steps(args.dry_run):
        if args.only and name not in args.only:
            continue
        left = deadline - time.perf_counter()
        if left < 15:
            report["steps"][name] = {"status": "skipped (suite budget spent)", "result": None}
            continue
        report["steps"][name] = run_step(name, cmd, min(limit, left), out / "logs" if out else None)
    head = headline(report)
    if out is not None:
        write_text(out / "gpu_suite.json", json.dumps(report, indent=1))
        write_text(out / "gpu_suite.md", markdown(head))
    print(json.dumps(head))
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
