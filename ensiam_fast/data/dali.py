"""The DALI loader: K augmented uint8 views per image from a shard directory (CPU or GPU).

See the package docstring (``ensiam_fast.data``) for the contract.

Resuming mid-epoch. A training pipeline is built with DALI's checkpointing on, so
``state_dict(batch)`` can save the pipeline's own state after ``batch`` batches (the webdataset
reader's position and shuffle buffer, every ``fn.random`` generator, which also feed the Numba
kernels their draws) and ``iter_from(batch, state)`` rebuilds the epoch's pipeline from it: the
same batches as an uninterrupted pass, at the cost of one pipeline build wherever the epoch was cut.
Without a state (a checkpoint from before, or a pipeline DALI could not checkpoint) the loader
replays the epoch's first ``batch`` batches instead (``replayed`` counts them).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ensiam_fast.data.preflight import preflight
from ensiam_fast.data.spec import LoaderSpec, derive_seed
from ensiam_fast.placement import resolve_device
from ensiam_fast.shards.format import IMAGE_EXTS, ShardFormatError, image_problem, parse_labels
from ensiam_fast.shards.index import read_index, write_index

READER = "reader"  # the reader's name in the pipeline: its metadata gives the epoch size
SHUFFLE_BUFFER = 2048  # encoded samples held for in-shard shuffling (~220 MB of ImageNet JPEGs)
VERIFY_HINT = "check the shards with `python tools/make_shards.py --verify {root}`"


# ----------------------------------------------------------------------------- shard indices


def ensure_indices(root: Path, tars: list[str], idxs: list[str]) -> list[str]:
    """The index paths to use: missing ones are regenerated from their tar (beside it when the
    dataset directory is writable, else in a temporary directory), with a warning."""
    out = []
    fallback_dir: Path | None = None
    for tar, idx in zip(tars, idxs):
        if Path(idx).is_file():
            out.append(idx)
            continue
        target = Path(idx)
        if not os.access(target.parent, os.W_OK):
            fallback_dir = fallback_dir or Path(tempfile.mkdtemp(prefix="ensiam_idx_"))
            target = fallback_dir / target.name
        warnings.warn(
            f"DALI index {idx} is missing; regenerating it from {tar} into {target} "
            f"(tools/make_shards.py writes it; {VERIFY_HINT.format(root=root)})",
            stacklevel=3,
        )
        try:
            write_index(tar, target)
        except (OSError, tarfile.TarError) as e:
            raise ShardFormatError(f"cannot index shard {tar} ({e}); {VERIFY_HINT.format(root=root)}") from e
        out.append(str(target))
    return out


def find_undecodable(tars: list[str], idxs: list[str], budget_s: float = 30.0) -> tuple[str, str] | None:
    """The first (tar, member) whose image fails the check of ``shards.format.image_problem``,
    searched for at most ``budget_s``."""
    deadline = time.monotonic() + budget_s
    for tar, idx in zip(tars, idxs):
        with open(tar, "rb") as f:
            for m in (m for sample in read_index(idx) for m in sample if m.ext in IMAGE_EXTS):
                if time.monotonic() > deadline:
                    return None
                f.seek(m.offset)
                if image_problem(f.read(m.size)):
                    return tar, m.member
    return None


# ----------------------------------------------------------------------------- the DALI loader


class DaliLoader:
    """One epoch of (x, y) batches per iteration; see the module docstring for the contract."""

    # Training loaders build the next epoch's pipeline in the background once an epoch starts.
    build_ahead = True

    def __init__(self, spec: LoaderSpec, *, device: str | torch.device = "cpu", cpu_kernels: str = "auto"):
        from pipelines import dali as dali_pipes
        from pipelines.kernels import backend as cpu_backend

        self._pipes = dali_pipes
        cpu_backend(cpu_kernels)  # a bad name fails here (data.cpu_kernels: auto | numba | dali)
        self.cpu_kernels = cpu_kernels
        split = spec.split
        self.spec = spec
        self.root, self.split = split.root, split.name
        self.train, self.preset, self.size, self.views = spec.train, spec.preset, spec.image_size, spec.views
        self.shuffle = spec.shuffle
        self.kind, self.device_id, self.device = resolve_device(device)
        dali_pipes.check_jigsaw(self.size, self.preset.jigsaw_grid)
        self._tars = split.tars
        self._idxs = ensure_indices(self.root, split.tars, split.idxs)
        preflight(split, self._idxs)
        self.batch_size, self.labeled, self.num_classes = spec.batch_size, split.labeled, split.num_classes
        self.shard_id, self.num_shards, self.seed = spec.shard_id, spec.num_shards, spec.seed
        self.num_threads = spec.num_threads or len(os.sched_getaffinity(0))
        self._total, self.num_samples, self._batches = split.num_samples, spec.num_samples, spec.num_batches
        self.epoch = 0
        self._pipe = None
        self._pipe_fresh = False
        self._ahead: tuple | None = None  # (epoch, thread, result box) of the pipeline built ahead
        self.last_build_s = 0.0
        self.last_built_ahead = False
        self.checkpointing = spec.train  # DALI tracks the pipeline's state (off if a build refuses it)
        self._live: tuple | None = None  # (epoch, batches handed out, pipeline) of the epoch under way
        self.replayed = 0  # batches the last iter_from ran only to advance the pipeline
        self._build()  # fail at construction, not in the middle of the first epoch

    # -- contract -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose data order and augmentations the next iteration yields."""
        if int(epoch) != self.epoch or not self._pipe_fresh:
            self.epoch = int(epoch)
            self._build()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def state_dict(self, batch: int) -> dict | None:
        """The loader's position after ``batch`` batches of the current epoch, for ``iter_from``:
        the pipeline's DALI checkpoint. None at an epoch's start (nothing to restore) or when the
        epoch under way is not at that batch or cannot be checkpointed."""
        if batch == 0 or self._live is None or self._live[:2] != (self.epoch, batch):
            return None
        try:
            checkpoint = self._live[2].checkpoint()
        except RuntimeError:
            return None
        return {"backend": "dali", "epoch": self.epoch, "batch": batch, "shard_id": self.shard_id,
                "num_shards": self.num_shards, "checkpoint": checkpoint}  # fmt: skip

    def _usable(self, state: dict | None, start_batch: int) -> bool:
        return (
            isinstance(state, dict)
            and state.get("backend") == "dali"
            and (state.get("epoch"), state.get("batch")) == (self.epoch, start_batch)
            and (state.get("shard_id"), state.get("num_shards")) == (self.shard_id, self.num_shards)
            and isinstance(state.get("checkpoint"), (bytes, str))
        )

    def iter_from(self, start_batch: int, state: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start_batch.. of the current epoch, identical to a full pass from that point:
        from ``state`` (``state_dict(start_batch)`` of an earlier run) when it fits, else by replay."""
        if not 0 <= start_batch <= self._batches:
            raise ValueError(f"start_batch must be in 0..{self._batches}, got {start_batch}")
        if start_batch and self._usable(state, start_batch):
            self._pipe = None
            pipe = self._make_pipe(self.epoch, checkpoint=state["checkpoint"])
            self._pipe_fresh = False
            return self._epoch(pipe, start_batch, self.epoch, replay=False)
        if not self._pipe_fresh:
            self._build()
        self._pipe_fresh = False
        return self._epoch(self._pipe, start_batch, self.epoch)

    # -- internals ----------------------------------------------------------------------------
    def _epoch_tars(self, epoch: int) -> tuple[list[str], list[str]]:
        """An epoch's tar order: permuted for training with a seed every rank shares."""
        if not self.shuffle:
            return self._tars, self._idxs
        order = np.random.default_rng(derive_seed(self.seed, epoch, 0xD1)).permutation(len(self._tars))
        return [self._tars[i] for i in order], [self._idxs[i] for i in order]

    def _build(self) -> None:
        """Make the current epoch's pipeline ready: the one built ahead if any, else built now."""
        self._pipe = self._live = None  # release the previous pipeline's threads and buffers first
        t0 = time.perf_counter()
        pipe = self._take_ahead(self.epoch)
        self.last_built_ahead = pipe is not None
        self._pipe = pipe if pipe is not None else self._make_pipe(self.epoch)
        self._pipe_fresh = True
        self.last_build_s = time.perf_counter() - t0

    def _build_ahead(self, epoch: int) -> None:
        """Start building ``epoch``'s pipeline in a background thread (the current epoch runs on).

        Tracing a RandAugment graph takes seconds of Python; DALI's graph definition state is
        thread-local, so it can happen while the current pipeline runs. The pipeline depends only
        on (seed, epoch, shard), so one built ahead is the one ``set_epoch`` would build.
        """
        if not self.build_ahead or (self._ahead is not None and self._ahead[0] == epoch):
            return
        box: dict = {}

        def work():
            try:
                box["pipe"] = self._make_pipe(epoch)
            except BaseException as e:  # re-raised in the thread that asks for this epoch
                box["error"] = e

        # not a daemon: the interpreter waits for it at exit, instead of killing it inside DALI's pipeline
        # construction (std::terminate, 'terminate called without an active exception', SIGABRT: an exit
        # right after the first batch, or after an error raised in it, came out as -6 instead of 0 or 2)
        thread = threading.Thread(target=work, name=f"dali-build-epoch-{epoch}", daemon=False)
        thread.start()
        self._ahead = (epoch, thread, box)

    def _take_ahead(self, epoch: int):
        """The pipeline built ahead for ``epoch`` (waiting for it), or None."""
        if self._ahead is None or self._ahead[0] != epoch:
            return None
        _, thread, box = self._ahead
        self._ahead = None
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["pipe"]

    def _make_pipe(self, epoch: int, checkpoint: bytes | str | None = None):
        """Define, build and check the pipeline of one epoch, restored from a DALI ``checkpoint``
        if given (no loader state is changed but ``checkpointing``, when DALI refuses it)."""
        try:
            return self._define_and_build(epoch, checkpoint)
        except ShardFormatError:
            if not self.checkpointing or checkpoint is not None:
                raise
        pipe = self._define_and_build(epoch, None, checkpointing=False)  # the error was not the shards'
        self.checkpointing = False
        warnings.warn("DALI cannot checkpoint this pipeline: a resume replays the epoch up to its batch", stacklevel=3)
        return pipe

    def _define_and_build(self, epoch: int, checkpoint: bytes | str | None, checkpointing: bool | None = None):
        tars, idxs = self._epoch_tars(epoch)
        pipe = self._pipes.build_kview_pipeline(
            tars,
            idxs,
            labeled=self.labeled,
            preset=self.preset,
            views=self.views,
            size=self.size,
            batch_size=self.batch_size,
            device=self.kind,
            device_id=self.device_id,
            num_threads=self.num_threads,
            seed=derive_seed(self.seed, epoch, self.shard_id, 0xA6),
            reader_seed=derive_seed(self.seed, epoch, self.shard_id, 0x5F),
            shuffle=self.shuffle,
            initial_fill=min(SHUFFLE_BUFFER, max(1, self.num_samples)),
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            cpu_kernels=self.cpu_kernels,
            checkpointing=self.checkpointing if checkpointing is None else checkpointing,
            checkpoint=checkpoint,
        )
        try:
            pipe.build()
        except RuntimeError as e:
            raise ShardFormatError(
                f"DALI could not open the shards of split {self.split!r} in {self.root}: {_first_line(e)}; "
                + VERIFY_HINT.format(root=self.root)
            ) from e
        epoch_size = pipe.reader_meta(READER)["epoch_size"]
        if epoch_size != self._total:
            raise ShardFormatError(
                f"the indices of split {self.split!r} in {self.root} list {epoch_size} samples but the manifest "
                f"says {self._total}; " + VERIFY_HINT.format(root=self.root)
            )
        return pipe

    def _run(self, pipe, batch: int, stream=None):
        # On the GPU the outputs are bound to torch's stream: no host synchronisation per batch.
        try:
            return pipe.run(stream)
        except RuntimeError as e:
            raise self._explain(e, batch) from e

    def _epoch(self, pipe, start: int, epoch: int, replay: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device) if self.kind == "gpu" else None
        self.replayed = start if replay else 0
        for b in range(start if replay else 0):  # no saved state: the RNGs only advance by running
            self._run(pipe, b, stream)
        shape = (self.views, self.batch_size, 3, self.size, self.size)
        for b in range(start, self._batches):
            outs = self._run(pipe, b, stream)
            if b == start and self.train:  # this epoch is under way: prepare the next one
                self._build_ahead(epoch + 1)
            x = torch.empty(shape, dtype=torch.uint8, device=self.device)
            for k in range(self.views):  # one copy per view, straight into its final place
                feed_ndarray(outs[k].as_tensor(), x[k], cuda_stream=stream)
            if self.labeled:
                try:
                    y = torch.from_numpy(parse_labels(np.asarray(outs[self.views].as_tensor())))
                except ShardFormatError as e:  # a tar trusted by its recorded check, yet a label is no index
                    head = f"split {self.split!r} of {self.root}, epoch {epoch}, batch {b}"
                    raise ShardFormatError(f"{e} ({head}); " + VERIFY_HINT.format(root=self.root)) from None
            else:
                y = torch.full((self.batch_size,), -1, dtype=torch.int64)
            keep = min(self.batch_size, self.num_samples - b * self.batch_size)
            if keep < self.batch_size:  # evaluation's last batch: drop the reader's wrap-around
                x, y = x[:, :keep].contiguous(), y[:keep]
            self._live = (epoch, b + 1, pipe)  # what state_dict saves while the consumer holds batch b
            yield x, y.to(self.device, non_blocking=True)

    def _explain(self, error: RuntimeError, batch: int) -> Exception:
        """Map a DALI pipeline failure to an error naming the shard and what to do."""
        text = str(error)
        head = f"split {self.split!r} of {self.root}, epoch {self.epoch}, batch {batch}"
        if "decoders.image" in text or "nvImageCodec" in text or "decod" in text.lower():
            found = find_undecodable(self._tars, self._idxs)
            where = (
                f"image {found[1]} in shard {found[0]}"
                if found
                else f"an image in one of the shards {', '.join(Path(t).name for t in self._tars[:8])}"
                + (" ..." if len(self._tars) > 8 else "")
            )
            return ShardFormatError(
                f"cannot decode {where} ({head}); the shard is corrupt: re-make it, and "
                + VERIFY_HINT.format(root=self.root)
            )
        return RuntimeError(
            f"DALI pipeline failed ({head}): {_first_line(error)}; " + VERIFY_HINT.format(root=self.root)
        )


def _first_line(error: Exception) -> str:
    lines = [ln for ln in str(error).splitlines() if ln.strip() and "Critical error" not in ln]
    return lines[-1].strip() if lines else type(error).__name__
