#!/usr/bin/env python
"""Peak memory and time of one training step per setting: fused, views_per_pass, grad checkpointing.

    python tools/bench_memory.py                                   # R18 CIFAR stem, 32x32, batch 64, K=16, CPU
    python tools/bench_memory.py --device cuda --size 64 --batch 256 --views 4 8 16
    python tools/bench_memory.py --backbone resnet50 --no-cifar-stem --size 224 --batch 32 --views 4

Settings per K: fused (all K views in one pass), ``views_per_pass`` 1, 2 and K/2, each without and
with ``model.grad_checkpointing`` (``--settings`` picks). One step is: forward, EnSiam loss, backward
(``ensiam_fast.methods.train_views``, the trainer's own step), SGD step, on random views.

How memory is measured. CUDA: ``torch.cuda.max_memory_allocated`` over the step, minus what was
allocated before it (the model, its gradients after a warm-up step, the optimizer's momentum), so
``peak_mb`` is what the step adds. CPU: every setting runs in a fresh subprocess, which imports,
builds the model and optimizer and the input, reads its resident set (``/proc/self/statm``) as the
baseline, runs one step and reads the kernel's high-water mark (``ru_maxrss``); ``peak_mb`` is the
difference (the gradients and momentum created by that first step included, the same in every
setting). ``base_mb`` is the baseline. ``step_s``: CUDA, the median of ``--steps`` steps after one
warm-up; CPU, the median of the steps after the first (``--cpu-steps``, default 2; with 1, that step).

``--abba``: step time only, in one process, every setting against fused in turn (F S S F, repeated
``--rounds`` times), so machine noise hits both sides alike; reports the median time ratio per setting.

The last line printed is one JSON object: ``{"results": [{"views", "views_per_pass",
"grad_checkpointing", "peak_mb", "step_s", ...}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

# isort: off
import common  # noqa: F401  (tools/common.py: the checkout first on sys.path)
import ensiam_fast  # noqa: E402,F401  (before torch: the runtime's OpenMP setting)
import torch  # noqa: E402

# isort: on

MB = 2**20


def settings(k: int, which: list[str]) -> list[tuple[int, bool]]:
    """(views_per_pass, grad_checkpointing) pairs for K, in a fixed order, without repeats."""
    per_pass = {"fused": k, "1": 1, "2": 2, "half": k // 2}
    out: list[tuple[int, bool]] = []
    for ckpt in (False, True):
        for name in ("fused", "1", "2", "half"):
            n = per_pass[name]
            if name in which and (ckpt or "nockpt" in which) and (not ckpt or "ckpt" in which):
                if 1 <= n <= k and k % n == 0 and (n, ckpt) not in out:
                    out.append((n, ckpt))
    return out


def one_setting(args, k: int, n: int, ckpt: bool) -> dict:
    """Build, then time and measure one step (``--steps`` on CUDA); runs in the current process."""
    from ensiam_fast import memory
    from ensiam_fast.methods import build_method, train_views
    from ensiam_fast.models import enable_grad_checkpointing

    device = torch.device(args.device)
    torch.manual_seed(0)
    method = build_method("ensiam", k, backbone=args.backbone, cifar_stem=args.cifar_stem).to(device).train()
    if ckpt:
        enable_grad_checkpointing(method.model)
    if args.channels_last:
        method = method.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(k, args.batch, 3, args.size, args.size, device=device)
    if args.channels_last:
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # NHWC memory per view
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step():
        train_views(method, method, x, n, lambda loss: loss.backward(), autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)

    row = {"views": k, "views_per_pass": n, "grad_checkpointing": ckpt}
    if device.type == "cuda":
        try:
            return _cuda_step(row, step, device, args.steps)
        except torch.cuda.OutOfMemoryError:
            return {**row, "peak_mb": None, "base_mb": None, "step_s": None, "out_of_memory": True}

    base = memory._rss_bytes() or 0
    times = []
    for i in range(max(1, args.cpu_steps)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = memory.maxrss_bytes() - base
    elapsed = statistics.median(times[1:] or times)
    return {**row, "peak_mb": round(peak / MB, 1), "base_mb": round(base / MB, 1), "step_s": round(elapsed, 4)}


def abba(args, k: int) -> list[dict]:
    """Median step time of each setting over alternating rounds against fused, and the ratio."""
    from ensiam_fast.methods import build_method, train_views

    device = torch.device(args.device)
    torch.manual_seed(0)
    method = build_method("ensiam", k, backbone=args.backbone, cifar_stem=args.cifar_stem).to(device).train()
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(k, args.batch, 3, args.size, args.size, device=device)

    def timed(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_views(method, method, x, n, lambda loss: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    timed(k)  # warm-up
    rows = []
    for n, ckpt in settings(k, args.settings):
        if n == k or ckpt:
            continue
        fused, chunked = [], []
        for _ in range(args.rounds):
            fused.append(timed(k))
            chunked += [timed(n), timed(n)]
            fused.append(timed(k))
        f, c = statistics.median(fused), statistics.median(chunked)
        rows.append({"views": k, "views_per_pass": n, "fused_s": round(f, 3), "step_s": round(c, 3),
                     "ratio": round(c / f, 3), "fused_all": [round(t, 2) for t in fused],
                     "chunked_all": [round(t, 2) for t in chunked]})  # fmt: skip
        print(f"K={k} views_per_pass={n}: {c:.2f} s against fused {f:.2f} s = {c / f:.2f}x", flush=True)
    return rows


def _cuda_step(row: dict, step, device: torch.device, steps: int) -> dict:
    step()  # warm-up: cuDNN's choices, and the momentum buffers exist from here on
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) - base
    return {**row, "peak_mb": round(peak / MB, 1), "base_mb": round(base / MB, 1),
            "step_s": round(statistics.median(times), 4)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--no-cifar-stem", dest="cifar_stem", action="store_false")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=64, help="images per view")
    ap.add_argument("--views", type=int, nargs="+", default=[16], help="K values")
    ap.add_argument(
        "--settings",
        nargs="+",
        default=["fused", "1", "2", "half", "nockpt", "ckpt"],
        help="which of fused, 1, 2, half (K/2) and nockpt/ckpt (without/with grad checkpointing)",
    )
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (CUDA; CPU measures one)")
    ap.add_argument(
        "--cpu-steps",
        type=int,
        default=2,
        help="CPU: steps per setting; the first gives the memory, the others the time (median)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--abba", action="store_true", help="time only: each setting alternated with fused")
    ap.add_argument("--rounds", type=int, default=2, help="--abba: F S S F rounds per setting")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "K,n,ckpt": one setting, in this process
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    if args.one:
        k, n, ckpt = (int(v) for v in args.one.split(","))
        print(json.dumps(one_setting(args, k, n, bool(ckpt))))
        return 0
    if args.abba:
        rows = [row for k in args.views for row in abba(args, k)]
        print(json.dumps({"device": args.device, "backbone": args.backbone, "size": args.size, "batch": args.batch,
                          "abba": rows}))  # fmt: skip
        return 0
    results = []
    for k in args.views:
        for n, ckpt in settings(k, args.settings):
            if args.device == "cuda":
                row = one_setting(args, k, n, ckpt)
                torch.cuda.empty_cache()
            else:  # a fresh process per setting: the high-water mark starts from this setting's baseline
                cmd = [
                    sys.executable,
                    __file__,
                    *(argv if argv is not None else sys.argv[1:]),
                    "--one",
                    f"{k},{n},{int(ckpt)}",
                ]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed", file=sys.stderr)
                    return done.returncode
                row = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(row)
            shown = (
                "out of memory"
                if row["peak_mb"] is None
                else f"peak {row['peak_mb']:8.1f} MB  step {row['step_s']:.3f} s"
            )
            print(f"K={k:2d} views_per_pass={n:2d} grad_checkpointing={ckpt!s:5}  {shown}", flush=True)
    print(json.dumps({"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                      "machine": platform.machine(), "backbone": args.backbone, "cifar_stem": args.cifar_stem,
                      "size": args.size, "batch": args.batch, "precision": args.precision,
                      "results": results}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
