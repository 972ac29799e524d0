"""The command line of the gradient-variance analysis (``tools/grad_variance.py``).

    python tools/grad_variance.py --views 2,4,8 --draws 32 --batch-size 64             # random init (demo)
    python tools/grad_variance.py --checkpoint runs/demo/checkpoints/step-00000330.pt  # a trained network
    python tools/grad_variance.py --run runs/demo --data shards/digits --device cuda

The fixed batch is the first ``--batch-size`` images of the split in stored order (shards are
written in a seeded random order, so it mixes the classes). Draw m of K views is epoch m of a
training loader that does not shuffle: the real augmentation pipeline (DALI by default) with its
own seed per (seed, K) and epoch. Without a checkpoint the network is built from ``--config`` (and
``key=value`` overrides) with ``--seed``. The plot of the gradient-covariance trace (and of the
target variance, the squared norm of the mean gradient and the relative noise) against K goes to
``--plot``; the last line printed is one JSON object with a ``results`` list of ``{method, views,
grad_var_trace, ci_low, ci_high, mean_grad_sq(_low/_high), relative_noise(_low/_high), target_var,
...}`` and a ``comparisons`` list of paired K-aug/EnSiam ratios (``kaug_over_ensiam`` of the trace,
``kaug_over_ensiam_mean_grad_sq``, ``kaug_over_ensiam_relative_noise``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ensiam_fast import placement
from ensiam_fast.analysis.gradvar import Settings, check_settings, measure
from ensiam_fast.checkpoint import CheckpointError, resolve_checkpoint
from ensiam_fast.command import argument_parser
from ensiam_fast.config import TrainConfig, config_from_dict, load_config
from ensiam_fast.data import build_loader, normalize
from ensiam_fast.data.spec import derive_seed
from ensiam_fast.errors import ConfigError, UserError
from ensiam_fast.export import load_weights_strict
from ensiam_fast.models import build_model
from ensiam_fast.paths import resolve_data_root
from ensiam_fast.rundir import atomic_write
from ensiam_fast.stems import check_stem
from pipelines.presets import get_preset


class UsageError(UserError):
    """A command-line value that cannot run; the message names the flag."""


def parse_views(text: str) -> tuple[int, ...]:
    try:
        views = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--views must be comma-separated integers such as 2,4,8, got {text!r}") from None
    if not views:
        raise UsageError(f"--views must list at least one K, got {text!r}")
    return views


def parse_args(argv=None) -> argparse.Namespace:
    p = argument_parser("python tools/grad_variance.py", __doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a checkpoint file (RUN/checkpoints/step-XXXXXXXX.pt)")
    source.add_argument("--run", help="a run directory: its newest complete checkpoint")
    source.add_argument("--config", default=None, help="preset for a randomly initialised network (default: demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (random init only)")
    p.add_argument("--data", help="shard directory (default: the config's data.root)")
    p.add_argument("--split", help="split to take the fixed batch from (default: the config's data.split)")
    p.add_argument("--preset", help="augmentation preset (default: the config's data.preset)")
    p.add_argument("--views", default="2,4,8", help="the K values, comma-separated (default: 2,4,8)")
    p.add_argument("--methods", default="ensiam,simsiam_kaug", help="losses compared on the same views")
    p.add_argument("--draws", type=int, default=32, help="independent draws of K views (M, default 32)")
    p.add_argument("--batch-size", type=int, default=64, help="images in the fixed batch (default 64)")
    p.add_argument("--seed", type=int, default=0, help="network initialisation and augmentation seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: cuda when there is one)")
    p.add_argument("--backend", choices=("dali", "torch"), help="loader backend (default: the config's)")
    p.add_argument("--threads", type=int, help="loader threads (default: the config's data.num_threads)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the draws (default 2000)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument(
        "--plot", default="grad_variance.png", help="PNG of the trace against K (default: ./grad_variance.png)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def resolve_model_config(args) -> tuple[TrainConfig, dict | None, str]:
    """The config that names network and data, the checkpoint state (or None), and a description."""
    if args.checkpoint or args.run:
        if args.overrides:
            raise UsageError(f"key=value overrides apply to a random-init network only, got {args.overrides}")
        path, state = resolve_checkpoint(args.run, args.checkpoint)
        try:
            cfg = config_from_dict(state["config"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: the config stored in the checkpoint is invalid: {e}") from e
        state["path"] = str(path)
        return cfg, state, f"checkpoint {path} (step {int(state['step'])})"
    cfg = load_config(args.config or "demo", args.overrides)
    return cfg, None, f"random init (config {args.config or 'demo'}, seed {args.seed})"


def resolve_device(text: str) -> tuple[torch.device, str]:
    """The torch device and the loader's device (DALI augments where the network runs)."""
    _, _, device = placement.resolve_device(text, what="--device")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # DALI's GPU pipeline uses the current device
        return device, f"cuda:{device.index}"
    return device, "cpu"


class FixedBatchViews:
    """``draw(K, m)``: draw m of K views of the fixed batch, normalised, on the network's device."""

    def __init__(self, cfg: TrainConfig, args, device: torch.device, data_device: str):
        self.cfg, self.args, self.device, self.data_device = cfg, args, device, data_device
        self.root = resolve_data_root(args.data or cfg.data.root)
        self.split = args.split or cfg.data.split
        self.preset = get_preset(args.preset or cfg.data.preset, **cfg.data.preset_overrides)
        self.loader, self.views, self.labels = None, None, None

    def open(self, k: int):
        cfg = self.cfg
        return build_loader(
            self.root,
            self.split,
            batch_size=self.args.batch_size,
            views=k,
            preset=self.preset,
            device=self.data_device,
            seed=derive_seed(self.args.seed, k, 0x6A),
            train=True,
            shuffle=False,  # the same images every epoch; each epoch draws fresh views
            image_size=cfg.data.image_size,
            num_threads=self.args.threads or cfg.data.num_threads,
            backend=self.args.backend or cfg.data.backend,
            cpu_kernels=cfg.data.cpu_kernels,
        )

    def __call__(self, k: int, m: int) -> torch.Tensor:
        if k != self.views:
            self.loader, self.views = None, None  # release the previous K's pipeline first
            self.loader, self.views = self.open(k), k
        self.loader.set_epoch(m)
        x, y = next(iter(self.loader))
        if self.labels is None:
            self.labels = y.cpu()
        elif not torch.equal(y.cpu(), self.labels):  # a guard on the loader's contract
            raise RuntimeError(f"draw {m} of K={k} read other images than the first draw")
        return normalize(x.to(self.device, non_blocking=True))


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("grad_var_trace", "ci_low", "ci_high", "tr Cov[gradient] over draws"),
        ("mean_grad_sq", "mean_grad_sq_low", "mean_grad_sq_high", "|E gradient|^2 (squared norm of the mean)"),
        ("relative_noise", "relative_noise_low", "relative_noise_high", "relative noise: trace / |E gradient|^2"),
        ("target_var", "target_var_ci_low", "target_var_ci_high", "Var[b]: the target's variance (eq. 9)"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    for ax, (key, low, high, title) in zip(axes.flat, panels):
        for method in record["methods"]:
            rows = [r for r in record["results"] if r["method"] == method and 0 < r[key] < float("inf")]
            ks = [r["views"] for r in rows]
            y = [r[key] for r in rows]
            top = [min(r[high], 1e3 * r[key]) for r in rows]  # an infinite upper end drawn as a long bar
            err = [[r[key] - max(r[low], 1e-12) for r in rows], [t - r[key] for t, r in zip(top, rows)]]
            ax.errorbar(ks, y, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(record["views"], [str(k) for k in record["views"]])
        ax.set_xlabel("K (views per image)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    level = int(round(record["level"] * 100))
    fig.suptitle(
        f"{record['model']}\nB={record['batch_size']}, M={record['draws']} draws, {level}% bootstrap intervals",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, dpi=90, format="png")
    plt.close(fig)


def run(args) -> dict:
    settings = Settings(
        views=parse_views(args.views),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        draws=args.draws,
        seed=args.seed,
        bootstrap=args.bootstrap,
        level=args.level,
    )
    try:
        check_settings(settings)  # raises ValueError naming the flag: the user's input
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.batch_size < 2:
        raise UsageError(f"--batch-size must be at least 2 (BatchNorm needs two images), got {args.batch_size}")
    device, data_device = resolve_device(args.device)
    cfg, state, description = resolve_model_config(args)
    check_stem(cfg)  # the backbone's stem: one line, before the data is opened or the network built
    try:  # the preset's rules (pipelines/presets.py): an unknown name or field was a traceback
        draw = FixedBatchViews(cfg, args, device, data_device)
    except ValueError as e:
        raise UsageError(
            f"{f'--preset {args.preset}' if args.preset else f'data.preset={cfg.data.preset!r}'}: {e}"
        ) from e
    try:  # bad data, batch size or preset fail here, before the network is built (the loader's own checks)
        draw.open(settings.views[0])
    except ValueError as e:
        raise UsageError(f"{cfg.data.root}: {e}") from e
    torch.manual_seed(args.seed)
    m = cfg.model
    model = build_model(
        backbone=m.backbone, cifar_stem=m.cifar_stem, proj_layers=m.proj_layers, bn_mode=m.bn_mode,
        proj_hidden=m.proj_hidden, proj_dim=m.proj_dim, pred_hidden=m.pred_hidden, pretrained=m.pretrained,
    )  # fmt: skip
    if state is not None:
        load_weights_strict(model, state["model"], what="the network its config names", where=state["path"])
    model.to(device)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    bar = tqdm(
        total=len(settings.views) * settings.draws,
        desc="draws",
        file=sys.stderr,
        disable=args.quiet,
        dynamic_ncols=True,
    )
    with bar:
        measured = measure(model, draw, settings, on_draw=bar.update)
    record = {
        **measured,
        "model": description,
        "checkpoint": state["path"] if state else None,
        "data": draw.root,
        "split": draw.split,
        "preset": draw.preset.name,
        "batch_size": args.batch_size,
        "draws": settings.draws,
        "views": list(settings.views),
        "methods": list(settings.methods),
        "seed": args.seed,
        "device": str(device),
        "bootstrap": settings.bootstrap,
        "level": settings.level,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    plot(record, Path(args.plot))
    record["plot"] = str(args.plot)
    return record


def finite_or_null(value):
    """The record with every infinite or undefined number as null, so that the line is strict JSON:
    a null ``relative_noise`` or ``*_high`` means the mean gradient was not measured above zero
    (no finite bound), a null ratio that no resample gave one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        record = run(args)
    except UserError as e:  # flags, config keys, shard format, batch larger than the split (the loader's checks)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(finite_or_null(record), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
