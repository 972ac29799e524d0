"""The start checks of a training run that need the data: every problem that would stop the run,
found (on every process) before anything is built."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ensiam_fast.config import TrainConfig
from ensiam_fast.data.synthetic import check_synthetic
from ensiam_fast.errors import TrainingError, UserError
from ensiam_fast.placement import resolve_data_device
from ensiam_fast.rundir import open_regular
from ensiam_fast.shards import ShardFormatError, read_manifest
from ensiam_fast.shards.format import index_name
from ensiam_fast.shards.verdict import gate_split
from pipelines.presets import check_gpu_memory, check_jigsaw, get_preset


def check_data(cfg: TrainConfig, num_processes: int) -> dict:
    """Every data problem that would stop the run, found before anything is built."""
    if cfg.data.backend == "synthetic":  # no shards: random views on the device (ensiam_fast.data.synthetic)
        try:
            info = check_synthetic(
                image_size=cfg.data.image_size,
                num_samples=cfg.data.synthetic_samples,
                batch_size=cfg.batch_size,
                num_processes=num_processes,
                knn_every=cfg.knn_every,
            )
            info["data_identity"] = {"dataset": "synthetic", "samples": cfg.data.synthetic_samples}
            return info
        except ValueError as e:
            raise TrainingError(str(e)) from e
    try:
        manifest = read_manifest(cfg.data.root)
        train = manifest.split(cfg.data.split)
        gate_split(cfg.data.root, manifest, cfg.data.split)  # a split that failed its check: refused here
        needed = [cfg.data.knn_train_split, cfg.data.knn_test_split] if cfg.knn_every else []
        for name in needed:
            gate_split(cfg.data.root, manifest, name)
            if not manifest.split(name).labeled:
                raise TrainingError(
                    f"the kNN monitor needs labels, but split {name!r} of {cfg.data.root} is unlabelled; "
                    f"set data.knn_train_split/data.knn_test_split to labelled splits or knn_every=0"
                )
    except ShardFormatError as e:
        raise TrainingError(str(e)) from e
    if train.num_samples == 0:
        raise TrainingError(f"split {cfg.data.split!r} of {cfg.data.root} holds no samples")
    if cfg.batch_size % (num_processes * cfg.gradient_accumulation_steps):
        raise TrainingError(
            f"batch_size={cfg.batch_size} (global) does not split evenly over {num_processes} processes x "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}"
        )
    if cfg.batch_size > train.num_samples:
        raise TrainingError(
            f"batch_size={cfg.batch_size} is larger than split {cfg.data.split!r} of {cfg.data.root} "
            f"({train.num_samples} samples); lower batch_size"
        )
    size = cfg.data.image_size or (manifest.image_size[0] if manifest.image_size else None)
    if size is None:
        raise TrainingError(f"{cfg.data.root} has images of several sizes: set data.image_size")
    preset = get_preset(cfg.data.preset, **cfg.data.preset_overrides)
    try:
        check_jigsaw(size, preset.jigsaw_grid)
    except ValueError as e:
        raise TrainingError(f"the images of {cfg.data.root} are {size}x{size}, set data.image_size: {e}") from e
    if cfg.data.device != "cpu":  # the pipeline may run on the GPU: its projected memory there
        images = cfg.batch_size // (num_processes * cfg.gradient_accumulation_steps)
        try:
            check_gpu_memory(preset, size, images, cfg.views, cfg.data.gpu_memory_gb)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    identity = data_identity(cfg.data.root, manifest, cfg.data.split)
    return {
        "image_size": size,
        "num_samples": train.num_samples,
        "dataset": manifest.dataset,
        "data_identity": identity,
    }


def data_identity(root: str, manifest, split: str) -> dict:
    """What a dataset is, not where: the manifest's dataset name, the split, its sample count, and a
    hash of its shards' names and DALI indices (every member's name, offset and size), so a dataset
    moved to another path resumes and one re-made with other images does not."""
    info = manifest.split(split)
    digest = hashlib.sha256()
    for name in info.shards:
        digest.update(name.encode() + b"\0")
        index = Path(root) / index_name(name)
        try:
            with open_regular(index) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except (OSError, UserError) as e:
            raise TrainingError(f"cannot read the index {index} of {root}: {e}; check the dataset with "
                                f"`python tools/make_shards.py --verify {root}`") from e  # fmt: skip
    return {"dataset": manifest.dataset, "split": split, "samples": info.num_samples,
            "content": digest.hexdigest()[:16]}  # fmt: skip


def data_device(cfg: TrainConfig, accelerator) -> str:
    try:
        return resolve_data_device(cfg.data.device, accelerator)
    except ValueError as e:
        raise TrainingError(str(e)) from e


def estimate_checkpoint_bytes(cfg: TrainConfig) -> int:
    """About one checkpoint's size (the weights, buffers and SGD's momentum), from the network built on
    the meta device: no memory, no weights read, before the data or the model is built."""
    import torch

    from ensiam_fast.methods import build_method

    m = cfg.model
    with torch.device("meta"):
        method = build_method(
            cfg.method, cfg.views, backbone=m.backbone, cifar_stem=m.cifar_stem, proj_layers=m.proj_layers,
            bn_mode=m.bn_mode, proj_hidden=m.proj_hidden, proj_dim=m.proj_dim, pred_hidden=m.pred_hidden,
            pretrained=False,
        )  # fmt: skip
    params = sum(p.numel() * p.element_size() for p in method.parameters())
    return 2 * params + sum(b.numel() * b.element_size() for b in method.buffers())
