"""The linear-evaluation protocol: a linear classifier on the frozen backbone.

Linear evaluation (the paper's Section 4.1, which follows SimSiam, Chen & He 2021, Appendix A):
the backbone is frozen in eval mode (BatchNorm uses its running statistics) and a linear classifier
``nn.Linear(feature_dim, classes)`` on the globally pooled features, initialised N(0, 0.01) with a
zero bias as in SimSiam's ``main_lincls.py``, is trained with cross-entropy for 100 epochs on random
resized crop + flip views (preset ``linear``). Optimizer: SGD, momentum 0.9, a cosine schedule
without warm-up, lr = base_lr x batch / 256 with base_lr 0.1 and batch 256 (EnSiam Section 4.1:
"We used SGD for both pretraining and linear evaluation ... baselr 0.10"). Weight decay 0, as in
SimSiam's linear protocol (EnSiam's 1e-4 is stated for its optimizer in general; ``--weight-decay``
sets it). The crop's area range is torchvision's default 0.08-1 (the paper says "random cropping");
``--crop-scale LOW,HIGH`` sets it. SimSiam itself uses LARS with base lr 0.02 at batch 4096 for ImageNet; we do not.
``--feature-norm bn`` puts a BatchNorm1d without affine parameters before the linear layer (MoCo v3
/ MAE linear probing): still a linear classifier at test time, and insensitive to feature scale.
The test split is scored with the ``eval`` preset, every sample exactly once across processes.

``--precomputed`` is the fast variant for CPUs: features of the un-augmented training images are
extracted once (``eval`` preset) and the classifier is trained on those tensors. It skips the crop
augmentation, so its numbers are close to, not equal to, the protocol's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ensiam_fast.config import TrainConfig
from ensiam_fast.data import build_loader, normalize
from ensiam_fast.errors import UserError
from ensiam_fast.evaluate.knn import extract_features, gather_uneven, topk_correct
from ensiam_fast.paths import resolve_data_root
from ensiam_fast.schedule import cosine_lr
from ensiam_fast.shards import ShardFormatError, read_manifest
from pipelines.presets import get_preset


class EvaluationError(UserError):
    """Data or settings that cannot be evaluated; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# the linear classifier (pure tensors: no loaders, no processes)

FEATURE_NORMS = ("none", "bn")


@dataclass
class LinearSettings:
    epochs: int = 100
    batch_size: int = 256  # global, split across processes
    base_lr: float = 0.1  # lr = base_lr * batch_size / 256 unless ``lr`` is given
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    feature_norm: str = "none"  # none | bn (non-affine BatchNorm1d before the linear layer)
    seed: int = 0
    # random-resized-crop area range of the training views (the ``linear`` preset's: torchvision's default)
    crop_scale: tuple[float, float] = get_preset("linear").crop_scale

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise EvaluationError(f"epochs={self.epochs} and batch_size={self.batch_size} must be at least 1")
        # the bounds of training's optim.* (config_checks): a finite lr > 0, momentum in [0, 1), finite decay >= 0
        inf = float("inf")
        if not (0 < self.peak_lr < inf and 0 <= self.momentum < 1 and 0 <= self.weight_decay < inf):
            raise EvaluationError(
                f"lr={self.peak_lr} must be a finite number > 0, momentum={self.momentum} in [0, 1) and "
                f"weight_decay={self.weight_decay} a finite number >= 0"
            )
        low, high = self.crop_scale
        try:  # the rule's home: the preset's own check (pipelines/presets.py)
            get_preset("linear", crop_scale=(low, high))
        except ValueError:
            raise EvaluationError(
                f"crop_scale={low},{high} must satisfy 0 < low <= high <= 1 (an area fraction)"
            ) from None
        if self.feature_norm not in FEATURE_NORMS:
            raise EvaluationError(f"feature_norm={self.feature_norm!r} is not one of {FEATURE_NORMS}")


def linear_classifier(
    feature_dim: int, num_classes: int, feature_norm: str = "none", generator: torch.Generator | None = None
) -> nn.Sequential:
    """[BatchNorm1d(affine=False)] + Linear, the weight drawn from N(0, 0.01) and a zero bias."""
    fc = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(fc.weight, std=0.01, generator=generator)
    nn.init.zeros_(fc.bias)
    norm = [nn.BatchNorm1d(feature_dim, affine=False)] if feature_norm == "bn" else []
    return nn.Sequential(*norm, fc)


def linear_optimizer(head: nn.Module, settings: LinearSettings) -> torch.optim.SGD:
    return torch.optim.SGD(
        head.parameters(), lr=settings.peak_lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_linear(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: LinearSettings, *, progress: bool = False
) -> nn.Module:
    """Train the classifier on fixed features (N, D): reshuffled every epoch, last partial batch
    dropped (as the training loader does), cosine lr per step. Deterministic given ``settings.seed``."""
    settings.check()
    n, batch = features.shape[0], settings.batch_size
    if batch > n:
        raise EvaluationError(f"batch_size={batch} is larger than the {n} training samples; lower --batch-size")
    gen = torch.Generator().manual_seed(settings.seed)
    head = linear_classifier(features.shape[1], num_classes, settings.feature_norm, gen).to(features.device)
    optimizer = linear_optimizer(head, settings)
    steps_per_epoch = n // batch
    total = settings.epochs * steps_per_epoch
    head.train()
    step = 0
    bar = tqdm(range(settings.epochs), desc="linear (features)", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        order = torch.randperm(n, generator=gen).to(features.device)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            set_lr(optimizer, cosine_lr(step, total, settings.peak_lr))
            loss = F.cross_entropy(head(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return head.eval()


@torch.no_grad()
def classifier_correct(
    head: nn.Module, features: torch.Tensor, labels: torch.Tensor, chunk: int = 4096
) -> dict[int, int]:
    """Top-1 and top-5 hits of ``head`` (in eval mode) on features (N, D)."""
    head.eval()
    hits = {1: 0, 5: 0}
    for start in range(0, features.shape[0], chunk):
        got = topk_correct(head(features[start : start + chunk]), labels[start : start + chunk])
        hits = {k: hits[k] + got[k] for k in hits}
    return hits


# ---------------------------------------------------------------------------------------------
# the protocol over a dataset


@dataclass
class EvalData:
    root: str
    train_split: str
    test_split: str
    image_size: int
    num_classes: int
    train_samples: int = 0  # in the training split, for the batch-size check


def resolve_eval_data(
    cfg: TrainConfig,
    *,
    root: str | None = None,
    train_split: str | None = None,
    test_split: str | None = None,
    image_size: int | None = None,
) -> EvalData:
    """Dataset and splits from the run's config, with overrides; both splits must be labelled."""
    root = resolve_data_root(root or cfg.data.root)  # the trainer's path rule, for --data and older runs
    train_split = train_split or cfg.data.knn_train_split
    test_split = test_split or cfg.data.knn_test_split
    try:
        manifest = read_manifest(root)
        for flag, split in (("--train-split", train_split), ("--test-split", test_split)):
            if not manifest.split(split).labeled:
                raise EvaluationError(
                    f"split {split!r} of {root} is unlabelled, but evaluation needs labels; "
                    f"pass a labelled split with {flag} (labelled: "
                    f"{', '.join(n for n, s in manifest.splits.items() if s.labeled) or 'none'})"
                )
    except ShardFormatError as e:
        raise EvaluationError(str(e)) from e
    size = image_size or cfg.data.image_size or (manifest.image_size[0] if manifest.image_size else None)
    if size is None:
        raise EvaluationError(
            f"{root} has images of several sizes and the config sets no data.image_size; pass --image-size"
        )
    for split in (train_split, test_split):
        if manifest.split(split).num_samples == 0:
            raise EvaluationError(f"split {split!r} of {root} holds no samples")
    if manifest.num_classes < 2:
        raise EvaluationError(f"{root}/manifest.json lists {manifest.num_classes} classes; evaluation needs 2+")
    return EvalData(
        root, train_split, test_split, int(size), manifest.num_classes, manifest.split(train_split).num_samples
    )


@dataclass
class Runtime:
    """Where evaluation runs: the accelerator, the data device and how features are computed."""

    accelerator: object
    data_device: str  # cpu | gpu (where DALI decodes)
    backend: str
    channels_last: bool
    num_threads: int | None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def loader(self, data: EvalData, split: str, *, batch_size: int, train: bool, preset, seed: int = 0):
        return build_loader(
            data.root,
            split,
            batch_size=batch_size,
            views=1,
            preset=preset,
            device=self.data_device,
            shard_id=self.rank,
            num_shards=self.world,
            seed=seed,
            train=train,
            image_size=data.image_size,
            num_threads=self.num_threads,
            backend=self.backend,
        )

    def features_fn(self, backbone: nn.Module):
        device = self.accelerator.device
        return lambda x: backbone(x.to(device, non_blocking=True))

    def extract(self, backbone, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (not normalised) features and labels of this process's share of ``loader``."""
        feats, labels = extract_features(
            self.features_fn(backbone),
            loader,
            channels_last=self.channels_last,
            autocast=self.accelerator.autocast,
            l2_normalize=False,
        )
        return feats, labels.to(feats.device)


def fit_precomputed(
    backbone,
    data: EvalData,
    settings: LinearSettings,
    rt: Runtime,
    *,
    eval_batch_size: int,
    resize_ratio: float,
    progress: bool,
) -> tuple[nn.Module, int]:
    """Extract un-augmented training features once, then train the classifier on the tensors.

    Every process gathers all features and trains the same classifier (same seed, same data)."""
    preset = get_preset("eval", resize_ratio=resize_ratio)
    loader = rt.loader(data, data.train_split, batch_size=eval_batch_size, train=False, preset=preset)
    feats, labels = rt.extract(backbone, loader)
    feats, labels = gather_uneven(rt.accelerator, feats), gather_uneven(rt.accelerator, labels)
    return train_linear(feats, labels, data.num_classes, settings, progress=progress), int(feats.shape[0])


def fit_augmented(
    backbone, data: EvalData, settings: LinearSettings, rt: Runtime, *, progress: bool
) -> tuple[nn.Module, int]:
    """The protocol: every step a fresh random-resized-crop + flip batch through the frozen backbone."""
    settings.check()
    if settings.batch_size % rt.world:
        raise EvaluationError(f"batch_size={settings.batch_size} does not split evenly over {rt.world} processes")
    if data.train_samples and settings.batch_size > data.train_samples:
        raise EvaluationError(
            f"--batch-size {settings.batch_size} is larger than split {data.train_split!r} of "
            f"{data.root} ({data.train_samples} samples); lower --batch-size"
        )
    loader = rt.loader(
        data,
        data.train_split,
        batch_size=settings.batch_size // rt.world,
        train=True,
        preset=get_preset("linear", crop_scale=tuple(settings.crop_scale)),
        seed=settings.seed,
    )
    gen = torch.Generator().manual_seed(settings.seed)
    head = linear_classifier(backbone.num_features, data.num_classes, settings.feature_norm, gen)
    head = head.to(rt.accelerator.device)
    optimizer = linear_optimizer(head, settings)
    head, optimizer = rt.accelerator.prepare(head, optimizer)  # DDP over processes: gradients averaged
    features = rt.features_fn(backbone)
    total = settings.epochs * len(loader)
    bar = tqdm(total=total, desc="linear (augmented)", disable=not progress, dynamic_ncols=True)
    step = 0
    head.train()
    for epoch in range(settings.epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            with torch.no_grad(), rt.accelerator.autocast():
                f = features(normalize(x, channels_last=rt.channels_last)[0])  # (B, D), frozen
            set_lr(optimizer, cosine_lr(step, total, settings.peak_lr))
            loss = F.cross_entropy(head(f.float()), y.to(f.device))
            optimizer.zero_grad(set_to_none=True)
            rt.accelerator.backward(loss)
            optimizer.step()
            step += 1
            bar.update(1)
            if step % 20 == 0 or step == total:  # .item() syncs the device: not every step
                bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
    bar.close()
    return rt.accelerator.unwrap_model(head).eval(), len(loader) * settings.batch_size


def linear_evaluate(
    backbone: nn.Module,
    data: EvalData,
    settings: LinearSettings,
    rt: Runtime,
    *,
    precomputed: bool = False,
    eval_batch_size: int = 256,
    resize_ratio: float = 1.0,
    progress: bool = True,
) -> dict:
    """Train the linear classifier and score the test split: top-1/top-5 in percent."""
    settings.check()
    if precomputed and tuple(settings.crop_scale) != LinearSettings.crop_scale:
        raise EvaluationError(
            f"crop_scale={','.join(map(str, settings.crop_scale))} has no effect with --precomputed (cached "
            "features of un-augmented images, no crop): drop one of them"
        )
    start = time.perf_counter()
    if precomputed:
        head, seen = fit_precomputed(
            backbone, data, settings, rt, eval_batch_size=eval_batch_size, resize_ratio=resize_ratio, progress=progress
        )
    else:
        head, seen = fit_augmented(backbone, data, settings, rt, progress=progress)
    preset = get_preset("eval", resize_ratio=resize_ratio)
    test_loader = rt.loader(data, data.test_split, batch_size=eval_batch_size, train=False, preset=preset)
    feats, labels = rt.extract(backbone, test_loader)
    hits = classifier_correct(head, feats, labels)
    counts = torch.tensor([hits[1], hits[5], labels.shape[0]], device=feats.device, dtype=torch.float64)
    if rt.world > 1:
        counts = rt.accelerator.reduce(counts, reduction="sum")
    top1, top5, n = counts.tolist()
    return {
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "samples": int(n),
        "mode": "precomputed" if precomputed else "augmented",
        "train_samples_per_epoch": seen,
        "peak_lr": settings.peak_lr,
        **asdict(settings),
        "seconds": round(time.perf_counter() - start, 2),
    }
