"""The torchvision/webdataset loader (``backend="torch"``): the benchmark baseline for the DALI
loader, the fallback where DALI cannot be installed, and the other side of the parity tests. It
follows the loader contract of ``ensiam_fast.data.build_loader`` and augments with
``pipelines.reference.ViewAugment``:

* The order of an epoch is planned on sample *indices* in the main process, from the manifest's
  shard sizes alone: shard order shuffled with (seed, epoch), the rank's contiguous slice of that
  stream, then a shuffle buffer of ``SHUFFLE_BUFFER`` samples seeded with (seed, epoch, shard_id).
* DataLoader workers stream the tars with ``webdataset`` and each builds whole batches (batch ``b``
  goes to worker ``b % workers``, the DataLoader's round-robin order). A batch's augmentation is
  seeded from (seed, epoch, shard_id, b), so the output does not depend on the number of workers,
  and ``iter_from(b)`` gives exactly what the full epoch gives from ``b`` without decoding the
  batches it skips.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from ensiam_fast.data.preflight import preflight
from ensiam_fast.data.spec import LoaderSpec, loader_spec
from ensiam_fast.placement import resolve_device
from ensiam_fast.shards.format import IMAGE_EXTS, ShardFormatError, parse_label, shard_bounds
from ensiam_fast.shards.index import index_count
from pipelines.reference import ViewAugment

# Samples held by the shuffle buffer (indices only while planning; encoded bytes while reading).
SHUFFLE_BUFFER = 2048


# ---------------------------------------------------------------------------------------------
# Epoch planning: pure index arithmetic, the same in every process.
# ---------------------------------------------------------------------------------------------


def shuffle_buffer_order(stream: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of ``buffer`` slots emits ``stream`` in (fill, then swap out)."""
    out = np.empty_like(stream)
    slots: list[int] = []
    n = 0
    picks = rng.random(len(stream) + buffer)
    for i, item in enumerate(stream):
        slots.append(int(item))
        if len(slots) >= buffer:
            j = int(picks[i] * len(slots))
            slots[j], slots[-1] = slots[-1], slots[j]
            out[n] = slots.pop()
            n += 1
    tail = np.array(slots, dtype=stream.dtype)
    out[n:] = tail[rng.permutation(len(tail))]
    return out


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch: sample indices in output order and their batches."""

    order: np.ndarray  # global sample indices, in the order they are yielded
    shard_order: list[int]  # manifest shard indices, in the order they are read
    batch_size: int
    num_batches: int

    def batch(self, b: int) -> np.ndarray:
        return self.order[b * self.batch_size : (b + 1) * self.batch_size]


def plan_epoch(
    shard_sizes: list[int],
    *,
    batch_size: int,
    shard_id: int,
    num_shards: int,
    seed: int,
    epoch: int,
    train: bool,
    shuffle: bool = True,
) -> EpochPlan:
    """``shuffle`` (training only): shard order and shuffle buffer; without it a training plan reads
    the stored order, so every epoch's batches hold the same samples."""
    offsets = np.concatenate([[0], np.cumsum(shard_sizes)]).astype(np.int64)
    total = int(offsets[-1])
    if train:
        # Shard order is shared by all ranks (seeded without shard_id), so their slices are disjoint.
        if shuffle:
            shard_order = np.random.default_rng([seed, epoch]).permutation(len(shard_sizes)).tolist()
        else:
            shard_order = list(range(len(shard_sizes)))
        stream = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shard_order])
        # Equal slices on every rank (up to num_shards - 1 samples left out) keep len() equal across
        # ranks, so no rank waits for a batch the others never make.
        per_rank = total // num_shards
        mine = stream[shard_id * per_rank : (shard_id + 1) * per_rank]
        if shuffle:
            order = shuffle_buffer_order(mine, SHUFFLE_BUFFER, np.random.default_rng([seed, epoch, shard_id]))
        else:
            order = mine
        num_batches = len(order) // batch_size
        order = order[: num_batches * batch_size]
    else:
        shard_order = list(range(len(shard_sizes)))
        start, end = shard_bounds(total, shard_id, num_shards)
        order = np.arange(start, end, dtype=np.int64)
        num_batches = math.ceil(len(order) / batch_size)
    return EpochPlan(order=order, shard_order=shard_order, batch_size=batch_size, num_batches=num_batches)


def batch_seed(seed: int, epoch: int, shard_id: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, shard_id, batch]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Reading: webdataset streams the tars; each worker keeps only the samples of its own batches.
# ---------------------------------------------------------------------------------------------


def decode_rgb(data: bytes, where: str) -> torch.Tensor:
    """JPEG/PNG/WebP bytes -> uint8 (3, H, W) with libjpeg-turbo (a little faster than PIL here)."""
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of torchcodec (not a dependency here).
            warnings.filterwarnings("ignore", message=".*image decoding.*deprecated", category=DeprecationWarning)
            # EXIF orientation applied, as DALI's decoder does (adjust_orientation): both loaders see one image
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_image(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as e:
        raise ShardFormatError(f"{where}: cannot decode the image ({e}); re-make the shard") from e


def member(sample: dict, ext: str):
    """A webdataset sample's ``ext`` member; ``key..ext`` members (a ``".ext"`` field given to
    ``ShardWriter``) come with the extension ``.ext`` and count as the same."""
    return sample.get(ext, sample.get("." + ext))


def sample_label(sample: dict, where: str) -> int:
    raw = member(sample, "cls")
    if raw is None:
        raise ShardFormatError(f"{where}: labelled split but the sample has no .cls member")
    try:
        return parse_label(bytes(raw))
    except ValueError as e:
        raise ShardFormatError(f"{where}: {e}") from None


def image_bytes(sample: dict, where: str) -> bytes:
    for ext in IMAGE_EXTS:
        data = member(sample, ext)
        if data is not None:
            return data
    members = sorted(k for k in sample if not k.startswith("__"))
    wanted = ", ".join("." + e for e in IMAGE_EXTS)
    raise ShardFormatError(f"{where}: no image member ({wanted}); the sample has {members}")


@dataclass
class _WorkerError:
    """A ``ShardFormatError`` raised in a DataLoader worker, carried to the main process as an item."""

    message: str


class _KViewStream(IterableDataset):
    """Yields (x uint8 (K, B, 3, S, S), y int64 (B,)) for the batches ``start..`` of one planned epoch."""

    def __init__(self, tars: list[str], shard_sizes: list[int], labeled: bool, views: int, augment: ViewAugment):
        self.tars = tars
        self.offsets = np.concatenate([[0], np.cumsum(shard_sizes)]).astype(np.int64)
        self.labeled = labeled
        self.views = views
        self.augment = augment
        self.plan: EpochPlan | None = None
        self.start = 0
        self.seed_key = (0, 0, 0)  # (seed, epoch, shard_id)

    def _my_batches(self) -> list[int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return list(range(self.plan.num_batches))[self.start + worker :: workers]

    def _make_batch(self, b: int, samples: list[tuple[bytes, int, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.augment.size
        x = torch.empty((self.views, len(samples), 3, size, size), dtype=torch.uint8)
        y = torch.empty(len(samples), dtype=torch.int64)
        threads = torch.get_num_threads()
        # Ops on one small image gain nothing from intra-op threads and lose a lot to their
        # hand-offs (20x slower in-process at 32x32 on a busy 2-core box); DataLoader workers
        # already run single-threaded, the in-process path (num_threads=0) needs it said.
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                # Seeding per batch makes the output independent of worker count and of iter_from.
                torch.manual_seed(batch_seed(*self.seed_key, b))
                for j, (data, label, where) in enumerate(samples):
                    img = decode_rgb(data, where)
                    for k in range(self.views):
                        x[k, j] = self.augment(img)
                    y[j] = label
        finally:
            torch.set_num_threads(threads)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | _WorkerError]:
        try:
            yield from self._batches()
        except ShardFormatError as e:
            if get_worker_info() is None:
                raise
            # A DataLoader worker's exception reaches the main process with the worker's traceback
            # in its message: send the one-line message as an item instead (ReferenceLoader raises it).
            yield _WorkerError(str(e))

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan
        batches = self._my_batches()
        if not batches:
            return
        # slot[g] = (batch, position) for the samples this worker needs; -1 elsewhere.
        batch_of = np.full(int(self.offsets[-1]), -1, dtype=np.int64)
        pos_of = np.zeros_like(batch_of)
        for b in batches:
            idx = plan.batch(b)
            batch_of[idx] = b
            pos_of[idx] = np.arange(len(idx))
        pending: dict[int, list] = {b: [None] * len(plan.batch(b)) for b in batches}
        missing = {b: len(plan.batch(b)) for b in batches}
        next_i = 0
        for s in plan.shard_order:
            lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
            wanted = int((batch_of[lo:hi] >= 0).sum())
            if wanted == 0:
                continue  # nothing of this worker in this shard: do not even open it
            for i, sample in enumerate(wds.tarfile_samples([{"url": self.tars[s]}])):
                if i >= hi - lo:
                    raise ShardFormatError(f"{self.tars[s]} holds more samples than the manifest says ({hi - lo})")
                g = lo + i
                b = int(batch_of[g])
                if b < 0:
                    continue
                where = f"{self.tars[s]} (key {sample.get('__key__')!r})"
                label = sample_label(sample, where) if self.labeled else -1
                pending[b][int(pos_of[g])] = (image_bytes(sample, where), label, where)
                missing[b] -= 1
                wanted -= 1
                while next_i < len(batches) and missing[batches[next_i]] == 0:
                    done = batches[next_i]
                    yield self._make_batch(done, pending.pop(done))
                    next_i += 1
                if wanted == 0:
                    break  # the rest of this tar belongs to other workers or ranks
        if next_i < len(batches):
            raise ShardFormatError(
                f"shards {self.tars} hold fewer samples than the manifest says; re-run tools/make_shards.py"
            )


# ---------------------------------------------------------------------------------------------
# The loader (same contract as ensiam_fast.data.build_loader).
# ---------------------------------------------------------------------------------------------


class ReferenceLoader:
    """K-view loader over a torch DataLoader; ``for x, y in loader`` runs one epoch."""

    def __init__(
        self,
        stream: _KViewStream,
        *,
        plan_args: dict,
        num_workers: int,
        device: torch.device,
        num_classes: int,
        num_samples: int,
    ):
        self._stream = stream
        self._plan_args = plan_args
        self._num_workers = num_workers
        self._device = device
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.batch_size = plan_args["batch_size"]
        self.views = stream.views
        self.labeled = stream.labeled
        self.epoch = 0
        self._plan = plan_epoch(epoch=0, **plan_args)

    def __len__(self) -> int:
        return self._plan.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._plan = plan_epoch(epoch=self.epoch, **self._plan_args)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in 0..{len(self)}, got {start_batch}")
        self._stream.plan = self._plan
        self._stream.start = start_batch
        self._stream.seed_key = (self._plan_args["seed"], self.epoch, self._plan_args["shard_id"])
        # Never more workers than batches left: an idle worker would only cost a fork.
        workers = min(self._num_workers, len(self) - start_batch)
        loader = DataLoader(
            self._stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=self._device.type == "cuda",
        )
        for item in loader:
            if isinstance(item, _WorkerError):
                raise ShardFormatError(item.message)
            x, y = item
            if self._device.type != "cpu":
                x, y = x.to(self._device, non_blocking=True), y.to(self._device, non_blocking=True)
            yield x, y


def reference_loader(spec: LoaderSpec, *, device: str | torch.device = "cpu") -> ReferenceLoader:
    """The torchvision/webdataset loader of a checked spec; ``spec.num_threads`` is the number of
    DataLoader workers (0 runs in this process; default: the number of CPU cores)."""
    split = spec.split
    preflight(split)
    sizes = list(split.shard_sizes) or [index_count(p) for p in split.idxs]
    if len(sizes) != len(split.tars) or sum(sizes) != split.num_samples:
        raise ShardFormatError(
            f"{split.root}/manifest.json: split {split.name!r} shard_sizes {sizes} do not match its "
            f"{len(split.tars)} shards and {split.num_samples} samples; re-run tools/make_shards.py"
        )
    plan_args = dict(shard_sizes=sizes, batch_size=spec.batch_size, shard_id=spec.shard_id,
                     num_shards=spec.num_shards, seed=spec.seed, train=spec.train, shuffle=spec.shuffle)  # fmt: skip
    stream = _KViewStream(split.tars, sizes, split.labeled, spec.views, ViewAugment(spec.preset, spec.image_size))
    workers = len(os.sched_getaffinity(0)) if spec.num_threads is None else spec.num_threads
    return ReferenceLoader(stream, plan_args=plan_args, num_workers=workers, device=resolve_device(device)[2],
                           num_classes=split.num_classes, num_samples=spec.num_samples)  # fmt: skip


def build_reference_loader(root, split: str, *, device: str | torch.device = "cpu", **spec_args) -> ReferenceLoader:
    """``reference_loader`` of ``loader_spec(root, split, **spec_args)`` (the arguments of
    ``ensiam_fast.data.build_loader``)."""
    return reference_loader(loader_spec(root, split, **spec_args), device=device)
