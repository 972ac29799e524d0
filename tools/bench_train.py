#!/usr/bin/env python
"""Training-step throughput: the fused K-view forward against a loop over views, side by side.

    python tools/bench_train.py                          # CPU grid: K in {2,4}, fp32/bf16, NCHW/channels_last
    python tools/bench_train.py --compile                # also torch.compile, K=2 fp32 NCHW
    python tools/bench_train.py --device cuda --batch 256 --views 2 4 8 --impls fused loop joint --compile
    python tools/bench_train.py --bn-layer-only --compile   # one BatchNorm layer: per-view vs old vs joint

The implementations run the same training step on synthetic (K, B, 3, S, S) views (S = ``--size``,
default 32): forward, EnSiam loss, backward, SGD step. ``fused`` is ``SiameseNet`` with per-view
BatchNorm (one backbone pass over K*B images); ``loop`` is the same network with plain BatchNorm
called K times on B images (official SimSiam style), its outputs concatenated for the same loss;
``joint`` (optional) is the fused pass with plain BatchNorm pooling all K*B images (different
statistics: the cost of per-view BatchNorm is fused/joint). Every configuration builds each
once, warms up, then alternates steps (the order flips each round) so machine noise hits all;
figures are medians over the timed steps. Images/s counts B per step, views/s K*B.

Memory: on CUDA the peak allocated bytes per implementation (``torch.cuda.max_memory_allocated``,
reset before each step). On CPU there is no per-allocation counter, so only the process peak RSS
(``ru_maxrss``, all configurations together) is reported, which says little about either one.
On a CPU shared with other jobs, pass ``--threads 1``: with several OpenMP threads, a parallel region
waits for whichever thread the scheduler parked, and those stalls swamp the difference being measured.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import common  # tools/common.py: the checkout first on sys.path
import torch
from torch.utils.flop_counter import FlopCounterMode

from ensiam_fast.losses import ensiam_loss
from ensiam_fast.models import SiameseNet, build_model

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Config:
    views: int
    precision: str
    channels_last: bool
    compile: bool

    def label(self) -> str:
        fmt = "channels_last" if self.channels_last else "nchw"
        return f"K={self.views} {self.precision} {fmt}{' compiled' if self.compile else ''}"


IMPLS = ("fused", "loop", "joint")
HEADS = {"paper": {}, "tiny": {"proj_hidden": 32, "proj_dim": 32, "pred_hidden": 8}}


def loop_forward(model: SiameseNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K separate forwards of B images each, concatenated to (K, B, D)."""
    outs = [model(x[k : k + 1]) for k in range(x.shape[0])]
    return torch.cat([z for z, _ in outs]), torch.cat([p for _, p in outs])


class Runner:
    """One implementation's model, optimizer and step function for one configuration."""

    def __init__(self, impl: str, base: SiameseNet, cfg: Config, device: torch.device, heads: dict):
        model = copy.deepcopy(base)
        if impl in ("loop", "joint"):  # plain BatchNorm (loop: each of the K calls normalises one view)
            model = build_model(bn_mode="joint", **heads)
            model.load_state_dict(base.state_dict())
        model = model.to(device)
        model.set_views(cfg.views if impl == "fused" else 1)  # fixed before compiling: no recompile
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.impl, self.cfg, self.device = model, impl, cfg, device
        self.opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        forward = torch.compile(model) if cfg.compile else model
        self.forward = (lambda x: loop_forward(forward, x)) if impl == "loop" else forward
        dtype = DTYPES[cfg.precision]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def step(self, x: torch.Tensor) -> None:
        with self.autocast():
            z, p = self.forward(x)
        loss = ensiam_loss(p.float(), z.float())
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)


def synced_time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def count_step_flops(base: SiameseNet, views: int, batch: int, size: int, device: torch.device) -> float:
    """FLOPs of one fused fp32 training step (forward + backward), counted by torch's FlopCounterMode."""
    model = copy.deepcopy(base).to(device)
    x = torch.randn(views, batch, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        z, p = model(x)
        ensiam_loss(p, z).backward()
    return float(counter.get_total_flops())


def measure(cfg: Config, base: SiameseNet, args, device: torch.device) -> dict:
    x = torch.randn(cfg.views, args.batch, 3, args.size, args.size, device=device)
    if cfg.channels_last:  # the loader's layout: each image channels_last, views stacked in front
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    runners = [Runner(impl, base, cfg, device, HEADS[args.heads]) for impl in args.impls]
    compile_s = {}
    for r in runners:
        compile_s[r.impl] = synced_time(lambda r=r: r.step(x), device)  # first step: compile / lazy init
        for _ in range(args.warmup):
            r.step(x)
    times = {r.impl: [] for r in runners}
    peaks = {r.impl: 0 for r in runners}
    for i in range(args.steps):
        for r in runners if i % 2 == 0 else runners[::-1]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[r.impl].append(synced_time(lambda r=r: r.step(x), device))
            if device.type == "cuda":
                peaks[r.impl] = max(peaks[r.impl], torch.cuda.max_memory_allocated(device))
    out = {"views": cfg.views, "precision": cfg.precision, "channels_last": cfg.channels_last, "compile": cfg.compile}
    for impl, ts in times.items():
        med = statistics.median(ts)
        out[impl] = {
            "step_s_median": med,
            "step_s_all": ts,
            "steps_per_s": 1 / med,
            "images_per_s": args.batch / med,
            "views_per_s": cfg.views * args.batch / med,
            "first_step_s": compile_s[impl],
        }
        if device.type == "cuda":
            out[impl]["peak_mem_mib"] = peaks[impl] / 2**20
    if "fused" in times and "loop" in times:
        out["fused_over_loop_speed"] = out["fused"]["steps_per_s"] / out["loop"]["steps_per_s"]
    if "fused" in times and "joint" in times:
        out["per_view_over_joint_speed"] = out["fused"]["steps_per_s"] / out["joint"]["steps_per_s"]
    return out


def bn_per_view_cat(x, k, layer):
    """The previous PerViewBatchNorm: K native kernels on dim-0 slices, outputs concatenated."""
    return torch.cat(
        [
            torch.nn.functional.batch_norm(
                view, layer.running_mean, layer.running_var, layer.weight, layer.bias, True, 0.1, layer.eps
            )
            for view in x.chunk(k)
        ]
    )


def bench_bn_layer(args, device: torch.device) -> list[dict]:
    """One ResNet-18 CIFAR layer-1 BatchNorm (K*B, 64, S, S), forward + backward, per format and
    precision: the shipped per-view layer against the previous one (``torch.cat``) and joint BN,
    eager and (``--compile``) compiled."""
    from ensiam_fast.batchnorm import PerViewBatchNorm

    k, c = max(args.views), 64
    results = []
    for fmt in args.formats:
        for prec in [p for p in (args.precisions or ["fp32", "bf16"]) if p in ("fp32", "bf16")]:
            dtype = torch.float32 if prec == "fp32" else torch.bfloat16
            x0 = torch.randn(k * args.batch, c, args.size, args.size, device=device, dtype=dtype)
            if fmt == "channels_last":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            layer = PerViewBatchNorm(c).to(device)
            layer.num_views = k
            joint = torch.nn.BatchNorm2d(c).to(device)
            variants = {
                "joint": joint,
                "per_view": layer,  # the shipped PerViewBatchNorm
                "per_view_cat": lambda x, layer=layer: bn_per_view_cat(x, k, layer),
            }
            if args.compile:
                variants.update(
                    {
                        f"{n}_compiled": torch.compile(copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v)
                        for n, v in list(variants.items())
                    }
                )
            grad = torch.randn_like(x0)

            def run(fn, x0=x0, grad=grad):
                x = x0.detach().requires_grad_()
                fn(x).backward(grad)

            times = {name: [] for name in variants}
            first = {name: synced_time(lambda fn=fn: run(fn), device) for name, fn in variants.items()}
            for i in range(args.steps * 2):
                for name, fn in list(variants.items()) if i % 2 == 0 else list(variants.items())[::-1]:
                    times[name].append(synced_time(lambda fn=fn: run(fn), device))
            med = {name: statistics.median(ts) for name, ts in times.items()}
            print(
                f"BN layer {fmt} {prec} fwd+bwd ms: " + ", ".join(f"{n} {1e3 * t:.3f}" for n, t in med.items()),
                flush=True,
            )
            results.append(
                {
                    "shape": list(x0.shape),
                    "views": k,
                    "format": fmt,
                    "precision": prec,
                    "median_ms": {n: 1e3 * t for n, t in med.items()},
                    "first_call_s": first,
                    "over_joint": {n: t / med["joint"] for n, t in med.items()},
                    "per_view_over_cat": med["per_view_cat"] / med["per_view"],
                }
            )
    return results


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--batch", type=int, default=32, help="B, images per view")
    ap.add_argument("--size", type=int, default=32, help="image side S (ResNet-18 with the CIFAR stem)")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=["fused", "loop"])
    ap.add_argument(
        "--heads",
        choices=sorted(HEADS),
        default="paper",
        help="projector/predictor widths: the paper's (2048/2048/512) or tiny ones (smoke runs)",
    )
    ap.add_argument("--views", type=int, nargs="+", default=[2, 4])
    ap.add_argument(
        "--precisions",
        nargs="+",
        choices=sorted(DTYPES),
        default=None,
        help="default: fp32 bf16 on CPU, fp32 bf16 fp16 on CUDA",
    )
    ap.add_argument("--formats", nargs="+", choices=["nchw", "channels_last"], default=["nchw", "channels_last"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first one")
    ap.add_argument(
        "--compile", action="store_true", help="add torch.compile for K=--compile-views, the first precision and format"
    )
    ap.add_argument("--compile-views", type=int, default=None, help="K of the compiled configuration (default: min)")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="the card's peak for the MFU figure (default: H100 SXM dense bf16)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--bn-layer",
        action="store_true",
        help="also time one BatchNorm layer: per-view (shipped), per-view with cat (previous), joint",
    )
    ap.add_argument("--bn-layer-only", action="store_true", help="only the BatchNorm-layer comparison")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = args.precisions or (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    configs = [
        Config(k, prec, fmt == "channels_last", False)
        for k in args.views
        for prec in precisions
        for fmt in args.formats
    ]
    if args.compile:
        configs.append(
            Config(args.compile_views or min(args.views), precisions[0], args.formats[0] == "channels_last", True)
        )
    torch.manual_seed(args.seed)
    bn_layer = bench_bn_layer(args, device) if args.bn_layer or args.bn_layer_only else None
    if args.bn_layer_only:
        print(
            json.dumps(
                {
                    "bench": "train_step_bn_layer",
                    "device": str(device),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "batch": args.batch,
                    "size": args.size,
                    "bn_layer": bn_layer,
                }
            )
        )
        return {"bn_layer": bn_layer}
    base = build_model(**HEADS[args.heads])  # resnet18, CIFAR stem, per-view BN
    flops = {k: count_step_flops(base, k, args.batch, args.size, device) for k in {c.views for c in configs}}
    results = []
    for cfg in configs:
        res = measure(cfg, base, args, device)
        res["gflops_per_step"] = flops[cfg.views] / 1e9
        if device.type == "cuda":
            for impl in args.impls:
                res[impl]["mfu"] = flops[cfg.views] * res[impl]["steps_per_s"] / (args.peak_tflops * 1e12)
        results.append(res)
        print(
            f"{cfg.label():32s} "
            + "  ".join(f"{i} {res[i]['images_per_s']:9.1f} img/s" for i in args.impls)
            + "".join(
                f"  {r} {res[r]:.3f}" for r in ("fused_over_loop_speed", "per_view_over_joint_speed") if r in res
            ),
            flush=True,
        )
    summary = {
        "bench": "train_step",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "size": args.size,
        "impls": args.impls,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": args.peak_tflops,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": results,
        "bn_layer": bn_layer,
    }
    for ratio in ("fused_over_loop_speed", "per_view_over_joint_speed"):
        values = [r[ratio] for r in results if ratio in r]
        if values:
            summary[f"{ratio}_min"], summary[f"{ratio}_median"] = min(values), statistics.median(values)
    return common.print_result(summary)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
