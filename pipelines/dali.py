"""DALI pipelines: read WebDataset shards, decode each image once, make K augmented views.

The stages of a view and one thin ``@pipeline_def`` wrapper. The same code builds the CPU and the
GPU pipeline: ``device`` picks the decoder backend (``cpu`` or ``mixed``) and how the views are made
(``augment_views``):

- on the GPU (and on the CPU with ``cpu_kernels='gpu_graph'``, its proxy) by the fused graph
  (``pipelines.fused``): a crop per view, then the K views as frames of one sample and each later
  stage one operator for all of them (CUDA kernels on the GPU, their CPU twins on the CPU);
- on the CPU by default, view by view (``view_stages``): every stage a fused Numba kernel run by
  DALI's ``numba_function`` (``pipelines.kernel_ops``), cheaper than DALI's CPU operators; the crop
  kernel also resamples as torchvision does.

Views leave the pipeline as uint8 CHW (normalisation happens in torch on the device, so only
bytes cross PCIe). The stages run in the preset's order (``AugPreset.stages``, the same order the
torchvision reference uses): crop -> flip -> colour (jitter, grayscale) -> blur -> RandAugment ->
jigsaw, then HWC -> CHW. The random resized crop and the flip that follows it are one resampling
on every path (``dali_ops.crop_flip``, ``kernel_ops.crop_stage``).
"""

from __future__ import annotations

import contextlib
import threading

from nvidia.dali import fn, pipeline_def, types

from pipelines import dali_ops as ops
from pipelines import kernel_ops as kops
from pipelines.fused import fused_views
from pipelines.kernels import backend as cpu_backend
from pipelines.presets import MAX_VIEWS, AugPreset, check_jigsaw, check_views

# The image members a sample may have (one of them); ensiam_fast.shards.format.IMAGE_EXTS, which this
# package may not import, lists the same (tests/test_adopt.py checks that they agree).
IMAGE_EXTS = "jpg;jpeg;png;webp"


def decoder_backend(device: str) -> str:
    """DALI backend of the image decoder: 'mixed' (CPU bytes in, GPU pixels out) or 'cpu'."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    return "mixed" if device == "gpu" else "cpu"


def read_shards(
    tars: list[str],
    idxs: list[str],
    *,
    labeled: bool,
    shuffle: bool,
    initial_fill: int,
    shard_id: int,
    num_shards: int,
    seed: int,
    name: str = "reader",
):
    """Encoded images (and raw ``.cls`` bytes when labelled) of this shard, in reader order.

    The reader splits the concatenation of ``tars`` (in the order given) into ``num_shards``
    contiguous blocks of samples; callers permute ``tars`` per epoch for shard-order shuffling.
    """
    ext = [IMAGE_EXTS, "cls"] if labeled else [IMAGE_EXTS]
    outputs = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=ext, missing_component_behavior="error",
                                    random_shuffle=shuffle, initial_fill=initial_fill, shard_id=shard_id,
                                    num_shards=num_shards, seed=seed, name=name)  # fmt: skip
    if labeled:
        return outputs[0], outputs[1]
    return (outputs if not isinstance(outputs, (list, tuple)) else outputs[0]), None


def decode(encoded, device: str):
    """Decode JPEG/PNG/WebP bytes to uint8 RGB HWC, on the GPU (nvJPEG) when device == 'gpu'."""
    return fn.decoders.image(encoded, device=decoder_backend(device), output_type=types.RGB)


def uses_fused_graph(device: str, kernels: str = "auto") -> bool:
    """Whether the K views are made by the fused GPU graph (``pipelines.fused``): always on the
    GPU; on the CPU when ``kernels`` (``data.cpu_kernels``) is 'gpu_graph', the CPU proxy of it."""
    return device == "gpu" or cpu_backend(kernels) == "gpu_graph"


def view_stages(preset: AugPreset, size: int, device: str = "cpu", kernels: str = "auto") -> list[tuple[str, object]]:
    """The stages of one view on the CPU in the preset's order, as (name, function of the views),
    then the HWC->CHW transpose: the fused Numba kernels, one operator per view and stage
    (``tools/bench_stages.py`` times them). The GPU graph has no per-view stages (``fused``)."""
    if uses_fused_graph(device, kernels):
        raise ValueError("the GPU graph (pipelines.fused) makes all K views at once: use augment_views")
    impl = {
        "colour": lambda v: kops.colour_stage(v, preset),
        "blur": lambda v: kops.blur_stage(v, preset),
        "randaugment": lambda v: kops.randaugment_stage(v, preset),
        "jigsaw": lambda v: kops.jigsaw_stage(v, preset, size),
        "flip": lambda v: ops.flip(v, preset.flip_p),
    }
    if preset.crop:  # torchvision's resampling, several times cheaper than DALI's resize
        impl["crop"] = lambda v: kops.crop_stage(v, preset, size, flip=False)
        impl["crop+flip"] = lambda v: kops.crop_stage(v, preset, size, flip=True)
    else:
        impl["crop"] = lambda v: ops.crop(v, preset, size)
        impl["crop+flip"] = lambda v: ops.crop_flip(v, preset, size)
    names = list(preset.stages)
    if preset.crop and names[:2] == ["crop", "flip"]:  # adjacent: one resampling does both
        names[:2] = ["crop+flip"]
    return [(name, impl[name]) for name in names] + [("chw", kops.chw_stage)]


def augment_view(images, preset: AugPreset, size: int, device: str = "cpu", kernels: str = "auto"):
    """One augmented view (uint8, 3 x size x size) of every decoded image in the batch (CPU
    kernels, one operator per stage)."""
    view = images
    for _, stage in view_stages(preset, size, device, kernels):
        view = stage(view)
    return view


def augment_views(images, preset: AugPreset, size: int, views: int, device: str, kernels: str = "auto") -> list:
    """K augmented views (each uint8, 3 x size x size) of every decoded image: the fused GPU graph
    (``uses_fused_graph``), or K chains of per-view CPU kernels."""
    if uses_fused_graph(device, kernels):
        return fused_views(images, preset, size, views, device)
    return [augment_view(images, preset, size, device, kernels) for _ in range(views)]


def label_bytes(cls):
    """The ``.cls`` bytes, zero-padded to the longest in the batch: (B, L) uint8 for the host."""
    return fn.pad(cls, fill_value=0, axes=[0])


@pipeline_def(enable_conditionals=True)
def kview_pipeline(*, reader: dict, augment: dict):
    """Outputs: K views (each a batch of uint8 3 x size x size) and, when labelled, label bytes.
    ``reader``: ``read_shards``'s arguments; ``augment``: ``augment_views``' after the images (both
    made by ``build_kview_pipeline``, the one home of these arguments)."""
    encoded, cls = read_shards(**reader)
    outputs = augment_views(decode(encoded, augment["device"]), **augment)
    if reader["labeled"]:
        outputs.append(label_bytes(cls))
    return tuple(outputs)


_TRACE_LOCK = threading.Lock()
_TRACE_USERS = [0, True]  # definitions in progress, DALI's setting before the first of them


@contextlib.contextmanager
def origin_traces_off():
    """Skip DALI's per-operator capture of the defining Python stack while a graph is defined.

    DALI keeps it only to decorate error messages, and capturing it dominates the definition of
    a RandAugment graph (about two thirds of its time): the loader names the failing shard itself.
    DALI's switch is private and process-wide, so concurrent definitions (the loader builds the
    next epoch in a thread) share one reference count and the first setting comes back after the
    last. Without the switch (another DALI version) nothing changes but the speed.
    """
    try:
        from nvidia.dali._utils import dali_trace
    except ImportError:
        yield
        return
    with _TRACE_LOCK:
        if _TRACE_USERS[0] == 0:
            _TRACE_USERS[1] = dali_trace.is_tracing_enabled()
            dali_trace.set_tracing(enabled=False)
        _TRACE_USERS[0] += 1
    try:
        yield
    finally:
        with _TRACE_LOCK:
            _TRACE_USERS[0] -= 1
            if _TRACE_USERS[0] == 0:
                dali_trace.set_tracing(enabled=_TRACE_USERS[1])


def build_kview_pipeline(
    tars: list[str],
    idxs: list[str],
    *,
    labeled: bool,
    preset: AugPreset,
    views: int,
    size: int,
    batch_size: int,
    device: str = "cpu",
    device_id: int | None = None,
    num_threads: int = 1,
    seed: int = 0,
    reader_seed: int = 0,
    shuffle: bool = False,
    initial_fill: int = 1024,
    shard_id: int = 0,
    num_shards: int = 1,
    prefetch_queue_depth: int = 2,
    cpu_kernels: str = "auto",
    checkpointing: bool = False,
    checkpoint: bytes | str | None = None,
):
    """Define (not build) the K-view pipeline; ``device_id`` must be None on the CPU.
    ``cpu_kernels`` ('auto', 'numba', 'dali') picks the CPU stages (``view_stages``).
    ``checkpointing``: DALI tracks the reader's position and every random generator, so
    ``pipe.checkpoint()`` can save them; ``checkpoint`` (such a string) restores them at build."""
    check_views(views)
    check_jigsaw(size, preset.jigsaw_grid)
    cpu_backend(cpu_kernels)  # a bad name fails here, before any graph is defined
    decoder_backend(device)
    if device == "gpu" and device_id is None:
        raise ValueError("device='gpu' needs a device_id (the CUDA device index)")
    if device == "cpu":
        device_id = None  # DALI 2.x: a CPU-only pipeline is one without a device
    with origin_traces_off():
        reader = dict(tars=list(tars), idxs=list(idxs), labeled=labeled, shuffle=shuffle, shard_id=shard_id,
                      initial_fill=max(1, int(initial_fill)), num_shards=num_shards, seed=reader_seed)  # fmt: skip
        augment = dict(preset=preset, size=size, views=views, device=device, kernels=cpu_kernels)
        return kview_pipeline(reader=reader, augment=augment, batch_size=batch_size, num_threads=num_threads,
                              device_id=device_id, seed=seed, prefetch_queue_depth=prefetch_queue_depth,
                              enable_checkpointing=checkpointing or checkpoint is not None,
                              checkpoint=checkpoint)  # fmt: skip


__all__ = [
    "MAX_VIEWS",
    "augment_view",
    "augment_views",
    "build_kview_pipeline",
    "check_jigsaw",
    "check_views",
    "decode",
    "decoder_backend",
    "kview_pipeline",
    "origin_traces_off",
    "read_shards",
    "uses_fused_graph",
    "view_stages",
]
