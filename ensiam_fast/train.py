"""Pretraining entry point.

    accelerate launch ensiam_fast/train.py --config ensiam_fast/configs/cifar10.yaml [key=value ...]
    python -m ensiam_fast.train --config demo epochs=2

Running the same command again resumes from the run directory's newest complete checkpoint.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch ensiam_fast/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# isort: off
import ensiam_fast  # noqa: F401  (before torch: it sets OpenMP's spin-wait, read when torch loads)
import torch

# isort: on

from ensiam_fast import distributed
from ensiam_fast.batchnorm_ops import convert_sync_batchnorm
from ensiam_fast.checkpoint import (
    check_compatible,
    check_fingerprint,
    checkpoint_dir,
    fingerprint,
    latest_checkpoint,
    set_rng_state,
)
from ensiam_fast.command import argument_parser
from ensiam_fast.config import TrainConfig, describe_keys, load_config, save_config
from ensiam_fast.data import build_loader
from ensiam_fast.distributed import agreed, report, report_first
from ensiam_fast.errors import ConfigError, UserError
from ensiam_fast.loop import TrainingLoop
from ensiam_fast.methods import build_method
from ensiam_fast.metrics import MetricsLog, flatten, read_metrics
from ensiam_fast.models import enable_grad_checkpointing
from ensiam_fast.placement import resolve_mixed_precision
from ensiam_fast.run_checks import check_data, data_device, estimate_checkpoint_bytes
from ensiam_fast.rundir import check_folder, check_storage, check_target, remove_stale_tmp
from ensiam_fast.runlock import RunLock
from ensiam_fast.runtime import configure_runtime
from ensiam_fast.stems import check_stem
from ensiam_fast.stopping import Interrupted, StopRequest
from pipelines.presets import get_preset

# ---------------------------------------------------------------------------------------------
# set-up

RUN_FILES = ("config.yaml", "metrics.jsonl", "curves.png")  # what the trainer writes in the run directory


def build_accelerator(cfg: TrainConfig):
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir)
    return distributed.build_accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),  # auto: Accelerate's own setting first
        timeout_s=cfg.dist_timeout_s, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.log_with == "none" else cfg.log_with, project_config=project,
    )  # fmt: skip


def build_optimizer(method, cfg: TrainConfig, peak_lr: float) -> torch.optim.Optimizer:
    groups = method.param_groups(peak_lr, cfg.optim.fix_pred_lr)
    return torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class Trainer(TrainingLoop):
    """Everything one run needs, built once (``__init__``), then ``fit()``: the loop (ensiam_fast/loop.py).

    ``stop`` is the run's one signal scope (ensiam_fast/stopping.py); ``lock`` the run directory's owner,
    taken by the main process before anything is read or written there (ensiam_fast/runlock.py)."""

    def __init__(self, cfg: TrainConfig, stop: StopRequest, lock: RunLock):
        self.cfg, self.stop, self.lock = cfg, stop, lock
        self.accelerator = acc = build_accelerator(cfg)
        self.out = Path(cfg.output_dir)
        # Each check runs on every process; if any fails, all stop together with one message.
        agreed(acc, check_stem, cfg)  # the backbone's family has the stem asked for: before anything is written
        agreed(acc, self.own_run_dir)  # a writable directory with one owner, before the data or model is built
        distributed.check_shared_output_dir(acc, self.out)
        self.info = agreed(acc, check_data, cfg, acc.num_processes)
        self.fingerprint = fingerprint(cfg, self.info["data_identity"], acc.num_processes, acc.mixed_precision)
        self.find_checkpoint()  # a resume that would change the math is refused before anything is built
        if acc.device.type == "cuda":
            torch.cuda.set_device(acc.device)  # DALI's GPU pipeline uses the current device
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.seed)
        self.data_device = agreed(acc, data_device, cfg, acc)
        self.loader = agreed(acc, self.build_train_loader)
        # torch's CPU threads: ENSIAM_THREADS=auto follows the machine's load (a fair share on a shared CPU)
        self.loader = configure_runtime(self.loader, device_type=acc.device.type)
        # optimizer steps; a step takes gradient_accumulation_steps loader batches (a tail too short to fill one
        # step is skipped, as a last partial batch is)
        self.steps_per_epoch = len(self.loader) // cfg.gradient_accumulation_steps
        self.batches_per_epoch = self.steps_per_epoch * cfg.gradient_accumulation_steps
        self.schedule_steps = cfg.epochs * self.steps_per_epoch  # max_steps caps the run, not the schedule
        self.total_steps = min(self.schedule_steps, cfg.max_steps or self.schedule_steps)
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.peak_lr = cfg.optim.base_lr * cfg.batch_size / 256
        self.pos = Position()
        self.resume_loader = None  # the loader state saved with the checkpoint resumed from
        self.build_model_and_optimizer()
        self.last_finite = self.pos.step  # the newest step whose state was checked finite
        # what is left: train, only the final evaluation (a signal ended the last run there), or nothing
        self.phase = self.remaining()
        if self.phase == "train":
            if acc.is_main_process:  # every check passed: only now is the run directory written
                for folder in (self.out, self.out / "checkpoints"):
                    remove_stale_tmp(folder)  # a write cut short by a crash
                save_config(cfg, self.out / "config.yaml")
            # wandb keeps its files in the run directory too (WANDB_MODE=offline runs without an account)
            acc.init_trackers(
                "ensiam_fast",
                config=flatten(cfg.to_dict()),
                init_kwargs={"wandb": {"dir": str(self.out), "name": self.out.name}},
            )
        # a finished run that is run again writes nothing; one that trains cuts its log back to the checkpoint
        self.log = MetricsLog(
            self.out / "metrics.jsonl", acc.is_main_process, self.pos.step if self.phase == "train" else None
        )

    def find_checkpoint(self) -> None:
        """The newest checkpoint, checked against this config: the network, the data position's meaning and
        the settings fingerprint (ensiam_fast/checkpoint.py)."""
        cfg, acc = self.cfg, self.accelerator
        self.resumed = agreed(acc, latest_checkpoint, self.out)  # unreadable files stop the run, not restart it
        distributed.agree_on(
            acc,
            "the checkpoint step to resume from",
            self.resumed and self.resumed[1]["step"],
            advice="every process must see the same checkpoints (one shared output_dir)",
        )
        if self.resumed is not None:
            path, state = self.resumed
            saved = state.get("fingerprint")
            if saved is None:  # written before fingerprints: the structural checks, then a note
                agreed(acc, check_compatible, cfg, state, path, acc.num_processes)
            for note in agreed(acc, check_fingerprint, saved, self.fingerprint, cfg.resume.allow_changes, path):
                self.say(note)

    def own_run_dir(self) -> None:
        """Main process: the storage check (a directory, writable, room for two checkpoints), then the lock."""
        if not self.accelerator.is_main_process:
            return
        for warning in check_storage(self.out, 2 * estimate_checkpoint_bytes(self.cfg)):
            self.say(f"warning: {warning}")
        with self.stop.deferred():  # a signal during the acquisition: the lock is whole, released by run()
            self.lock.acquire()
        for note in self.lock.notes:
            self.say(note)
        self.stop.raise_if_signalled()
        for name in RUN_FILES:  # a link or FIFO planted where the run will write: refused now, not at the end
            check_target(self.out / name)
        check_folder(checkpoint_dir(self.out))

    def remaining(self) -> str:
        """``train``; ``evaluate`` when the final checkpoint is saved but not the final kNN (a signal ended
        the last run there); ``done`` when nothing is left (a finished run run again writes nothing)."""
        if self.resumed is None or self.pos.step < self.total_steps:
            return "train"
        if self.cfg.knn_every:
            path = self.out / "metrics.jsonl"
            rows = read_metrics(path) if path.exists() else []
            if not any(r["step"] == self.pos.step and "knn_top1" in r for r in rows):
                return "evaluate"
        return "done"

    def build_train_loader(self):
        cfg, acc = self.cfg, self.accelerator
        return build_loader(
            cfg.data.root, cfg.data.split, views=cfg.views,
            batch_size=cfg.batch_size // (acc.num_processes * acc.gradient_accumulation_steps),
            preset=get_preset(cfg.data.preset, **cfg.data.preset_overrides), device=self.data_device,
            shard_id=acc.process_index, num_shards=acc.num_processes, seed=cfg.seed, train=True,
            image_size=self.info["image_size"], num_threads=cfg.data.num_threads, backend=cfg.data.backend,
            num_samples=self.info["num_samples"],
            cpu_kernels=cfg.data.cpu_kernels,
        )  # fmt: skip

    def build_model_and_optimizer(self) -> None:
        """The method and SGD, restored from the newest checkpoint when there is one, then prepared."""
        cfg, acc, m = self.cfg, self.accelerator, self.cfg.model
        method = build_method(
            cfg.method, cfg.views, backbone=m.backbone, cifar_stem=m.cifar_stem, proj_layers=m.proj_layers,
            bn_mode=m.bn_mode, proj_hidden=m.proj_hidden, proj_dim=m.proj_dim, pred_hidden=m.pred_hidden,
            pretrained=m.pretrained,
        )  # fmt: skip
        optimizer = build_optimizer(method, cfg, self.peak_lr)
        if self.resumed is not None:
            path, state = self.resumed
            method.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            self.pos = Position(state["step"], state["epoch"], state["batch_in_epoch"])
            saved = state.get("loader")  # one entry per rank (checkpoints from before: none)
            if isinstance(saved, list) and len(saved) == acc.num_processes:
                self.resume_loader = saved[acc.process_index]
            self.say(f"resuming from {path} at step {self.pos.step} (epoch {self.pos.epoch})")
        if m.grad_checkpointing:
            enable_grad_checkpointing(method.model)
        if m.sync_bn and acc.num_processes > 1:
            # Our converter keeps per-view statistics per view (torch's would leave them unsynced).
            method = convert_sync_batchnorm(method)
        if m.channels_last:
            method = method.to(memory_format=torch.channels_last)
        self.raw_method = method  # parameters shared with the wrapped module; used for checkpoints
        self.method, self.optimizer = acc.prepare(method, optimizer)
        if self.resumed is not None:
            if state.get("scaler") is not None and acc.scaler is not None:
                acc.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
        self.step_fn = torch.compile(self.method) if m.compile else self.method
        if cfg.views_per_pass == "auto" and cfg.memory_budget_gb is None and acc.device.type != "cuda":
            raise ConfigError("views_per_pass=auto on a CPU needs memory_budget_gb (GB for the step's peak)")
        # None (auto) until the first batch measures it
        self.views_per_pass = cfg.views if cfg.views_per_pass is None else cfg.views_per_pass
        if self.views_per_pass == "auto":
            self.views_per_pass = None


def run(cfg: TrainConfig, stop: StopRequest | None = None) -> dict | None:
    """Train; the summary on the main process, None on the others (so it is printed once). ``stop``: the
    signal scope ``main`` entered (a fresh one, installing no handler, when called from Python)."""
    lock, stop = RunLock(cfg.output_dir), stop or StopRequest()
    try:
        trainer = Trainer(cfg, stop, lock)  # the start checks: a signal ends them at once
        with stop.deferred():  # from here a signal waits for a boundary, except where fit marks a phase abortable
            summary = trainer.fit()
        stop.raise_if_signalled("after the run ended; everything is saved.")
    finally:
        lock.release()
    return summary if trainer.accelerator.is_main_process else None


def parse_args(argv=None):
    epilog = "config keys (key=default, then what it sets):\n" + "\n".join(describe_keys())
    parser = argument_parser("python -m ensiam_fast.train", __doc__, epilog=epilog)
    parser.add_argument(
        "--config", default=None, help="a YAML file or a preset name from ensiam_fast/configs (cifar10, demo, ...)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with StopRequest() as stop:  # one signal scope, from the first check to the last byte (stopping.py)
        try:
            return train_command(args, stop)
        except Interrupted as e:
            if distributed.global_rank() == 0:
                print(str(e), file=sys.stderr, flush=True)
            return 128 + e.signum


def train_command(args, stop: StopRequest) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as e:  # every process parses the same command line: the first one says it
        report_first(str(e))
        return 2
    try:
        summary = run(cfg, stop)
    except UserError as e:
        # Trainer runs its start checks through `agreed`: those errors are the same on every process.
        shared = getattr(e, "shared", True)
        report(str(e), shared=shared)
        if shared:
            distributed.settle()
        return 2
    except Exception as e:
        if distributed.requested_world_size() == 1 or not distributed.is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        report(
            f"lost contact with another process ({first}): a process died, froze past dist_timeout_s="
            f"{cfg.dist_timeout_s:g}s, or its machine dropped off. Run the same command again to resume "
            "from the newest checkpoint.",
            shared=False,
        )
        return 1
    if summary is None:  # not the main process: it says nothing
        return 0
    if "knn_start" in summary and "knn_end" in summary:
        print(f"kNN top-1: {summary['knn_start']:.2f}% at the start, {summary['knn_end']:.2f}% at the end")
    print(f"run directory {summary['run_dir']}: {', '.join(summary['files'])}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
