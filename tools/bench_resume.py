#!/usr/bin/env python
"""Time from start to the first trained step when a run resumes at 0%, 50% and 90% of an epoch.

    python tools/bench_resume.py                       # makes a 20,480-image split of 16x16 JPEGs in /tmp
    python tools/bench_resume.py --root shards/mydata  # an existing dataset (its 'train' split)
    python tools/bench_resume.py --replay              # also the same resumes without the loader state

For each position, a checkpoint is written the trainer's own way (``Trainer.checkpoint`` after the
loader has handed out that many batches: the DALI pipeline's state included), then
``python -m ensiam_fast.train`` is started on that run directory and timed from its start until
``metrics.jsonl`` shows the first step it trained (log_every=1). A tiny network (timm's
test_resnet, small heads) keeps the step itself short, so the figure is start-up plus getting the
data to the checkpoint's position. ``--replay`` repeats 50% and 90% with the loader state taken
out of the checkpoint (the loader then replays the epoch's first batches, as before).

The last line printed is one JSON object: ``{"images": N, "resume_s": {"0": s, "50": s, "90": s}}``
(plus ``"replay_s"`` with ``--replay``).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ensiam_fast.metrics import read_metrics  # noqa: E402
from pipelines.presets import CPU_KERNELS  # noqa: E402


def make_split(root: Path, images: int, size: int, per_shard: int = 1024) -> Path:
    """``images`` random-coloured JPEGs of ``size`` pixels in the shard format (train), plus a tiny test split."""
    import numpy as np
    from PIL import Image

    from ensiam_fast.shards import Manifest, SplitInfo, shard_name, write_manifest, write_shard

    if (root / "manifest.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    infos = {}
    for split, n in (("train", images), ("test", 64)):
        names, sizes = [], []
        for s, start in enumerate(range(0, n, per_shard)):
            samples = []
            for i in range(start, min(n, start + per_shard)):
                pixels = (rng.integers(0, 256, (1, 1, 3)) + rng.integers(0, 32, (size, size, 3))).clip(0, 255)
                buf = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
                samples.append((f"{split}_{i:07d}", {"jpg": buf.getvalue(), "cls": str(i % 10).encode()}))
            rec = write_shard(root / shard_name(split, s), samples)
            names.append(rec.name)
            sizes.append(rec.num_samples)
        infos[split] = SplitInfo(num_samples=n, shards=names, labeled=True, shard_sizes=sizes)
    write_manifest(root, Manifest(dataset="bench_resume", classes=[str(c) for c in range(10)], splits=infos,
                                  image_size=[size, size]))  # fmt: skip
    return root


def overrides(args, out: Path, max_steps: int) -> list[str]:
    return [f"output_dir={out}", f"data.root={args.root}", f"batch_size={args.batch}", f"views={args.views}",
            "epochs=1", f"max_steps={max_steps}", "log_every=1", "knn_every=0", "checkpoint_every=100000",
            f"data.image_size={args.size}", f"data.num_threads={args.threads}", "model.backbone=test_resnet",
            "model.proj_hidden=32", "model.proj_dim=32", "model.pred_hidden=8", "mixed_precision=no",
            "log_with=none", f"data.cpu_kernels={args.cpu_kernels}"]  # fmt: skip


def write_checkpoint(args, out: Path, batch: int) -> None:
    """A run directory whose newest checkpoint is at ``batch`` of epoch 0, written by the trainer."""
    from ensiam_fast.config import load_config
    from ensiam_fast.runlock import RunLock
    from ensiam_fast.stopping import StopRequest
    from ensiam_fast.train import Position, Trainer

    cfg = load_config("demo", overrides(args, out, batch + 1))
    lock = RunLock(cfg.output_dir)
    try:
        trainer = Trainer(cfg, StopRequest(), lock)
        trainer.loader.set_epoch(0)
        batches = trainer.batches()
        for _ in range(batch):
            next(batches)
        trainer.pos = Position(step=batch, epoch=0, batch_in_epoch=batch)
        trainer.checkpoint()
    finally:
        lock.release()


def drop_loader_state(out: Path) -> None:
    import torch

    from ensiam_fast.checkpoint import latest_checkpoint
    from ensiam_fast.rundir import atomic_write

    path, state = latest_checkpoint(out)
    state["loader"] = None
    with atomic_write(path) as f:  # the one writer: never a half-written checkpoint
        torch.save(state, f)


def time_resume(args, out: Path, batch: int) -> float:
    """Seconds from starting the trainer until metrics.jsonl has the step after ``batch``."""
    metrics = out / "metrics.jsonl"
    cmd = [sys.executable, "-m", "ensiam_fast.train", "--config", "demo", *overrides(args, out, batch + 1)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = None
    while proc.poll() is None and seen is None:
        # the one reader (ensiam_fast/metrics.py): a line the trainer is still writing is a torn last line
        if metrics.is_file() and any(r["step"] == batch + 1 for r in read_metrics(metrics)):
            seen = time.perf_counter() - t0
        time.sleep(0.02)
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"error: the resumed run failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    if seen is None:  # it finished between two polls
        seen = time.perf_counter() - t0
    return round(seen, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="a dataset with a 'train' split (default: make one)")
    ap.add_argument("--images", type=int, default=20_480, help="images in the split made when --root is not given")
    ap.add_argument("--size", type=int, default=16, help="image side (made split and training crops)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads")
    ap.add_argument(
        "--cpu-kernels",
        default="auto",
        choices=CPU_KERNELS,
        help="data.cpu_kernels (the trainer's choices, pipelines/presets.py)",
    )
    ap.add_argument("--replay", action="store_true", help="also time 50%% and 90%% without the loader state")
    ap.add_argument("--work", default=None, help="folder for the split and the runs (default: a temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_resume_"))
    if args.root is None:
        print(f"making a split of {args.images} images in {work / 'data'} ...", flush=True)
        args.root = str(make_split(work / "data", args.images, args.size))
    from ensiam_fast.shards import read_manifest

    images = read_manifest(Path(args.root)).splits["train"].num_samples
    batches = images // args.batch
    result: dict = {"images": images, "batches_per_epoch": batches, "resume_s": {}}
    plan = [("resume_s", p, True) for p in (0, 50, 90)] + [("replay_s", p, False) for p in (50, 90) if args.replay]
    for key, percent, keep_state in plan:
        batch = batches * percent // 100
        out = work / f"run_{key}_{percent}"
        write_checkpoint(args, out, batch)
        if not keep_state:
            drop_loader_state(out)
        seconds = time_resume(args, out, batch)
        result.setdefault(key, {})[str(percent)] = seconds
        print(f"{key} at {percent}% (batch {batch} of {batches}): {seconds:.2f} s", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
