"""The evaluation command line.

    python -m ensiam_fast.evaluate knn --run runs/demo
    python -m ensiam_fast.evaluate linear --run runs/demo [--precomputed] [--epochs 100]

``knn``: the training monitor's weighted kNN (ensiam_fast/evaluate/knn.py) with the run's ``knn_k``
and ``knn_t``. ``linear``: the linear-evaluation protocol (ensiam_fast/evaluate/linear.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from ensiam_fast.checkpoint import resolve_checkpoint
from ensiam_fast.command import argument_parser
from ensiam_fast.config import TrainConfig
from ensiam_fast.config_checks import validate
from ensiam_fast.config_parse import apply_values
from ensiam_fast.distributed import global_rank, report_first
from ensiam_fast.errors import ConfigError, UserError
from ensiam_fast.evaluate.knn import knn_evaluate
from ensiam_fast.evaluate.linear import (
    FEATURE_NORMS,
    EvaluationError,
    LinearSettings,
    Runtime,
    linear_evaluate,
    resolve_eval_data,
)
from ensiam_fast.export import load_backbone, source_info
from ensiam_fast.placement import resolve_data_device, resolve_mixed_precision
from ensiam_fast.rundir import check_target, write_text
from ensiam_fast.runlock import owning


def make_runtime(cfg: TrainConfig, backend: str | None = None) -> Runtime:
    from ensiam_fast.distributed import build_accelerator

    # the trainer's precision rule (the run's mixed_precision; auto: Accelerate's setting, else the device's);
    # one job over gloo on a CPU host too, with the run's collective deadline (ensiam_fast/distributed.py)
    accelerator = build_accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision), timeout_s=cfg.dist_timeout_s
    )
    if accelerator.device.type == "cuda":
        torch.cuda.set_device(accelerator.device)  # DALI's GPU pipeline uses the current device
    # the trainer's device rule, except that a run trained with data.device=gpu evaluates on a CPU-only host
    data_device = resolve_data_device("cpu" if cfg.data.device == "cpu" else "auto", accelerator)
    return Runtime(accelerator, data_device, backend or cfg.data.backend, cfg.model.channels_last, cfg.data.num_threads)


def parse_crop_scale(text: str) -> tuple[float, float]:
    """``--crop-scale LOW,HIGH`` as two floats (their range is LinearSettings.check's)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise EvaluationError(f"--crop-scale must be two numbers LOW,HIGH such as 0.2,1, got {text!r}") from None
    return low, high


def linear_settings(args: argparse.Namespace) -> LinearSettings:
    """The LinearSettings of a ``linear`` command line: each field is the option of its name."""
    given = {f.name: getattr(args, f.name) for f in fields(LinearSettings)}
    given["crop_scale"] = parse_crop_scale(args.crop_scale) if args.crop_scale else LinearSettings.crop_scale
    return LinearSettings(**given)


def write_json_atomic(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(record, indent=2) + "\n")


def run_command(args: argparse.Namespace) -> dict | None:
    """The result record on the main process (which also writes it), None on the others."""
    path, state = resolve_checkpoint(args.run, args.checkpoint)
    out = Path(args.out) if args.out else Path(source_info(path, state, None)["run"]) / f"{args.command}.json"
    check_target(out)  # a link or FIFO there: refused before the evaluation, not after it
    with owning(out.parent, main_process=global_rank() == 0):  # a run directory written into has one owner
        return evaluate(args, path, state)


def apply_options(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """The options that stand for config keys (--k: knn_k, ...) set on ``cfg`` and checked by the config's
    own rules (ensiam_fast/config_checks.py), so 0 is refused as in training, not taken for 'unset'."""
    keys = {"k": "knn_k", "t": "knn_t", "eval_batch_size": "eval_batch_size", "image_size": "data.image_size"}
    given = {key: getattr(args, opt) for opt, key in keys.items() if getattr(args, opt, None) is not None}
    if not given:
        return
    values: dict = {}
    for key, value in given.items():
        section, _, name = key.rpartition(".")
        (values.setdefault(section, {}) if section else values)[name] = value
    try:
        apply_values(cfg, values)
        validate(cfg)
    except ConfigError as e:
        named = " ".join(f"--{opt.replace('_', '-')} {getattr(args, opt)}" for opt, key in keys.items() if key in given)
        raise EvaluationError(f"{named}: {e}") from None


def evaluate(args: argparse.Namespace, path: Path, state: dict) -> dict | None:
    backbone, cfg = load_backbone(state, path)
    apply_options(cfg, args)
    data = resolve_eval_data(
        cfg, root=args.data, train_split=args.train_split, test_split=args.test_split, image_size=args.image_size
    )
    rt = make_runtime(cfg, args.backend)
    backbone = backbone.to(rt.accelerator.device)
    if rt.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    eval_batch = max(1, cfg.eval_batch_size // rt.world)
    source = source_info(path, state, cfg)
    info = {
        "checkpoint": str(path),
        "step": source["step"],
        "epoch": source["epoch"],
        "method": cfg.method,
        "data": data.root,
        "train_split": data.train_split,
        "test_split": data.test_split,
    }
    if args.command == "knn":
        k, t = cfg.knn_k, cfg.knn_t  # the options, when given, are already in cfg (apply_options)
        result = knn_evaluate(
            rt.features_fn(backbone),
            root=data.root,
            train_split=data.train_split,
            test_split=data.test_split,
            image_size=data.image_size,
            batch_size=eval_batch,
            device=rt.data_device,
            accelerator=rt.accelerator,
            k=k,
            t=t,
            resize_ratio=cfg.data.eval_resize_ratio,
            backend=rt.backend,
            channels_last=rt.channels_last,
            autocast=rt.accelerator.autocast,
            num_threads=rt.num_threads,
        )
        record = {
            "top1": result["knn_top1"],
            "top5": result["knn_top5"],
            "samples": result["knn_samples"],
            "k": k,
            "t": t,
            **info,
        }
    else:
        result = linear_evaluate(
            backbone,
            data,
            linear_settings(args),
            rt,
            precomputed=args.precomputed,
            eval_batch_size=eval_batch,
            resize_ratio=cfg.data.eval_resize_ratio,
            progress=rt.accelerator.is_main_process and not args.quiet,
        )
        record = {**result, **info}
    if not rt.accelerator.is_main_process:
        return None
    out = Path(args.out) if args.out else Path(source["run"]) / f"{args.command}.json"
    write_json_atomic(out, record)
    return record


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser("python -m ensiam_fast.evaluate", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = LinearSettings()
    for name, help_text in (
        ("linear", "linear evaluation (frozen backbone, trained linear classifier)"),
        ("knn", "weighted kNN accuracy, the training monitor's protocol"),
    ):
        p = commands.add_parser(name, help=help_text)
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--run", help="run directory: its newest complete checkpoint is evaluated")
        source.add_argument("--checkpoint", help="a checkpoint file (RUN/checkpoints/step-XXXXXXXX.pt)")
        p.add_argument("--data", help="dataset directory (default: the run's data.root)")
        p.add_argument("--train-split", help="labelled training split (default: data.knn_train_split)")
        p.add_argument("--test-split", help="labelled test split (default: data.knn_test_split)")
        p.add_argument("--image-size", type=int, help="default: the run's data.image_size or the dataset's")
        p.add_argument("--backend", choices=("dali", "torch"), help="loader backend (default: the run's)")
        p.add_argument("--eval-batch-size", type=int, help="feature-extraction batch (default: eval_batch_size)")
        p.add_argument("--out", help=f"result file (default: RUN/{name}.json)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "knn":
            p.add_argument("--k", type=int, help="neighbours (default: the run's knn_k)")
            p.add_argument("--t", type=float, help="temperature (default: the run's knn_t)")
        else:
            p.add_argument("--epochs", type=int, default=defaults.epochs)
            p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global training batch")
            p.add_argument("--base-lr", type=float, default=defaults.base_lr, help="lr = base_lr * batch / 256")
            p.add_argument("--lr", type=float, help="absolute peak lr (overrides --base-lr)")
            p.add_argument("--momentum", type=float, default=defaults.momentum)
            p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
            p.add_argument(
                "--feature-norm",
                choices=FEATURE_NORMS,
                default=defaults.feature_norm,
                help="bn: a BatchNorm1d without affine parameters before the linear layer",
            )
            p.add_argument(
                "--precomputed",
                action="store_true",
                help="train on cached features of un-augmented images (fast; no crop augmentation)",
            )
            p.add_argument("--seed", type=int, default=defaults.seed)
            p.add_argument(
                "--crop-scale",
                metavar="LOW,HIGH",
                help=f"area range of the training crops (default {','.join(map(str, defaults.crop_scale))})",
            )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        record = run_command(args)
    except UserError as e:
        report_first(str(e))
        return 2
    if record is not None:  # the main process only: one result line however many processes ran
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
