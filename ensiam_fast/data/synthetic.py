"""``data.backend=synthetic``: random uint8 views that live on the training device.

The compute ceiling of the trainer, as the synthetic data backend of NVIDIA's DeepLearningExamples:
no shards, no decoding, no augmentation and no host-to-device copy, so images/s measures the model,
the loss, the optimizer, logging and checkpoints alone, and the trainer runs where DALI and
webdataset are not installed (this module imports neither).

Each process draws two ``(K, B, 3, H, W)`` uint8 batches once, on its device, from a generator
seeded by (seed, shard_id), and yields them in turn: the same contract as the DALI loader
(``len``, ``set_epoch``, ``iter_from``; ``(views, labels)`` pairs), with labels all zero.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ensiam_fast.data.spec import derive_seed
from ensiam_fast.placement import resolve_device

DEFAULT_SAMPLES = 50_000  # images per synthetic epoch unless asked otherwise (CIFAR-10's train split)
POOL = 2  # distinct batches held on the device
# the loader arguments (ensiam_fast.data.spec.loader_spec's) that shape random views; the others augment
SHAPE_ARGS = ("batch_size", "views", "image_size", "seed", "shard_id", "num_shards")


def check_synthetic(
    *, image_size: int | None, num_samples: int, batch_size: int, num_processes: int, knn_every: int
) -> dict:
    """The settings a synthetic run needs, checked before anything is built; ``ValueError`` names the key."""
    if image_size is None:
        raise ValueError("data.backend=synthetic draws views of data.image_size pixels: set data.image_size")
    if num_samples < 1:
        raise ValueError(f"data.synthetic_samples={num_samples} must be at least 1")
    if knn_every:
        raise ValueError("data.backend=synthetic has no labelled images for the kNN monitor: set knn_every=0")
    if batch_size % num_processes:
        raise ValueError(f"batch_size={batch_size} (global) does not split evenly over {num_processes} processes")
    if batch_size > num_samples:
        raise ValueError(f"batch_size={batch_size} is larger than data.synthetic_samples={num_samples}")
    return {"image_size": image_size, "num_samples": num_samples, "dataset": "synthetic"}


class SyntheticLoader:
    """Random uint8 views ``(K, B, 3, H, W)`` already on ``device``; ``num_samples // (B * num_shards)``
    batches per epoch (every process the same number, as the sharded loaders)."""

    def __init__(
        self,
        *,
        batch_size: int,
        views: int,
        image_size: int | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        shard_id: int = 0,
        num_shards: int = 1,
        num_samples: int = DEFAULT_SAMPLES,
    ):
        if image_size is None or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        _, _, self.device = resolve_device(device)
        gen = torch.Generator(device=self.device).manual_seed(derive_seed(seed, shard_id))
        shape = (views, batch_size, 3, image_size, image_size)
        self.batches = [torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device, generator=gen)
                        for _ in range(POOL)]  # fmt: skip
        self.labels = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.num_batches = max(1, num_samples // (batch_size * num_shards))
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(start_batch, self.num_batches):
            yield self.batches[i % POOL], self.labels
