"""DALI pipelines: read WebDataset shards, decode each image once, make K augmented views.

Pure processing functions (one per augmentation stage) plus one thin ``@pipeline_def`` wrapper.
The same code builds the CPU and the GPU pipeline: ``device`` only picks the decoder backend
(``cpu`` or ``mixed``); every later operator runs where its input lives, and the per-sample random
parameters (drawn on the CPU, where DALI draws them) are moved next to the image when needed.

Views leave the pipeline as uint8 CHW (normalisation happens in torch on the device, so only
bytes cross PCIe). Stage order per view follows ``pipelines.presets``: crop -> flip -> colour
jitter -> grayscale -> blur -> RandAugment -> jigsaw; the flip is applied last, fused with the
HWC->CHW transpose (see ``finish``), which gives the same distribution of views.

On the CPU the colour, blur and RandAugment stages are, when Numba is usable, fused kernels run
by DALI's ``numba_function`` (``pipelines.cpu_kernels``: ``colour_fused``, ``blur_fused``,
``rand_augment_fused``, ``jigsaw_fused``), several times cheaper than DALI's CPU operators;
``ENSIAM_CPU_KERNELS=dali`` (or no Numba) uses the operators (``colour``, ``blur``,
``rand_augment``, ``jigsaw``), which the GPU pipeline always uses.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import rand_augment as dali_rand_augment

from pipelines import cpu_kernels
from pipelines.presets import AugPreset

MAX_VIEWS = 16
# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale (and DALI's hsv) use.
LUMA = (0.299, 0.587, 0.114)
# torchvision's RandAugment translates by up to 150/331 of the image side at the top magnitude.
RANDAUG_MAX_TRANSLATE_REL = 150.0 / 331.0


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
    ext = ["jpg;png", "cls"] if labeled else ["jpg;png"]
    outputs = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=ext,
        missing_component_behavior="error",
        random_shuffle=shuffle,
        initial_fill=initial_fill,
        shard_id=shard_id,
        num_shards=num_shards,
        seed=seed,
        name=name,
    )
    if labeled:
        return outputs[0], outputs[1]
    return (outputs if not isinstance(outputs, (list, tuple)) else outputs[0]), None


def decode(encoded, device: str):
    """Decode JPEG/PNG bytes to uint8 RGB HWC, on the GPU (nvJPEG) when device == 'gpu'."""
    return fn.decoders.image(encoded, device=decoder_backend(device), output_type=types.RGB)


def _near(param, device: str):
    """Move a per-sample CPU parameter next to GPU images (arithmetic needs one placement)."""
    return param.gpu() if device == "gpu" else param


def crop(images, preset: AugPreset, size: int):
    """Random resized crop to size x size, or (no randomness) shorter side to resize_ratio*size
    and a centre crop.

    Antialiased linear resampling, as torchvision's RandomResizedCrop on uint8 tensors: without
    it the crop costs ~25% less here (0.7 vs 0.95 ms per 224x224 view) but aliases large crops.
    """
    if preset.crop:
        return fn.random_resized_crop(
            images,
            size=[size, size],
            random_area=list(preset.crop_scale),
            random_aspect_ratio=list(preset.crop_ratio),
            antialias=True,
        )
    shorter = max(size, int(round(preset.resize_ratio * size)))
    resized = fn.resize(images, resize_shorter=shorter, antialias=True)
    return fn.crop(resized, crop=[size, size])


def grey_mean(images):
    """Per-image mean of the luma (torchvision's contrast centre), a float scalar per sample."""
    channel_mean = fn.reductions.mean(images, axes=[0, 1])  # (3,)
    return fn.reductions.sum(channel_mean * types.Constant(np.float32(LUMA)))


def brightness_contrast_expr(images, scale, shift):
    """round(x * scale + shift) saturated to uint8, as one fused element-wise expression."""
    return fn.cast(images * scale + shift, dtype=types.UINT8)  # cast rounds and saturates


def brightness_contrast(images, b, c, device: str):
    """torchvision's brightness(b) then contrast(c): b * (m + c * (x - m)), m the mean grey.

    On the CPU the per-image centre is an argument of DALI's fused operator (the cheapest path).
    On the GPU m is computed on the GPU, and DALI takes operator arguments only from the CPU, so
    the same formula runs as one element-wise expression there (cheap on a GPU).
    """
    m = grey_mean(images)
    if device == "cpu":
        return fn.brightness_contrast(images, brightness=b, contrast=c, contrast_center=m)
    return brightness_contrast_expr(images, _near(b * c, device), _near(b * (1.0 - c), device) * m)


def _coin(p: float):
    """A per-sample boolean, True with probability p (a predicate for DALI conditionals)."""
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _chroma_matrices(grey: bool) -> tuple[np.ndarray, ...]:
    """Constants (C0, C1, C2, C3) with hue(theta) . saturation(s) = C0 + s C1 + s cos C2 + s sin C3.

    Saturation is torchvision's blend with the luma grey, s I + (1 - s) 1 l^T. The hue shift is a
    rotation by theta about the grey diagonal (1, 1, 1): it keeps each pixel's channel sum and its
    distance from grey and, like HSV's hue, turns red into green at 120 degrees (a YIQ rotation,
    what DALI's ``hsv`` does, spreads the channels much less than torchvision's hue shift). With
    ``grey`` the matrices are premultiplied by the grey projection 1 l^T (jitter, then grayscale).
    """
    luma = np.array(LUMA, dtype=np.float64)
    eye, ones = np.eye(3), np.ones(3)
    u = ones / np.sqrt(3.0)
    diag = np.outer(u, u)
    cross = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    to_luma = np.outer(ones, luma)
    keep_luma = eye - to_luma
    mats = (to_luma, diag @ keep_luma, (eye - diag) @ keep_luma, cross @ keep_luma)
    if grey:
        mats = tuple(to_luma @ m for m in mats)
    return tuple(np.float32(m) for m in mats)


def draw_chroma(preset: AugPreset):
    """Per-sample (saturation factor, hue angle in radians); None for a disabled one."""
    sat = theta = None
    if preset.saturation > 0:
        sat = fn.random.uniform(range=[max(0.0, 1.0 - preset.saturation), 1.0 + preset.saturation])
    if preset.hue > 0:
        theta = fn.random.uniform(range=[-2.0 * np.pi * preset.hue, 2.0 * np.pi * preset.hue])
    return sat, theta


def chroma_matrix(sat, theta, grey: bool):
    """Per-sample 3x3 colour matrix: saturation ``sat`` then a hue rotation by ``theta``."""
    c0, c1, c2, c3 = (types.Constant(m) for m in _chroma_matrices(grey))
    sat = 1.0 if sat is None else sat
    if theta is None:
        return c0 + sat * (c1 + c2)
    return c0 + sat * (c1 + dmath.cos(theta) * c2 + dmath.sin(theta) * c3)


def jitter(images, preset: AugPreset, device: str, *, grey: bool = False):
    """ColorJitter(b, c, s, h) with every factor drawn, always applied (callers pick the samples),
    followed by the grayscale conversion when ``grey``.

    Brightness and contrast are one fused step (exact up to torchvision's intermediate clamp);
    saturation, hue (and grey) are one per-pixel 3x3 matrix (``coord_transform`` over the channel
    axis, rounded and saturated once). The order is fixed (b, c, s, h), where torchvision draws a
    random order per image.
    """
    out = images
    if preset.brightness > 0 or preset.contrast > 0:
        b = fn.random.uniform(range=[max(0.0, 1.0 - preset.brightness), 1.0 + preset.brightness])
        c = fn.random.uniform(range=[max(0.0, 1.0 - preset.contrast), 1.0 + preset.contrast])
        out = brightness_contrast(out, b, c, device)
    if preset.saturation > 0 or preset.hue > 0:
        return fn.coord_transform(out, M=chroma_matrix(*draw_chroma(preset), grey), dtype=types.UINT8)
    return to_grey(out) if grey else out


def to_grey(images):
    """Exact grey, 3 channels: ITU-R 601 luma, rounded once, copied into R, G and B."""
    grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return fn.color_space_conversion(grey, image_type=types.GRAY, output_type=types.RGB)


# From this view side up the colour stage routes views through DALI conditionals (per-pixel work
# dominates); below it one pass over every view is cheaper than splitting and merging batches.
BRANCH_MIN_SIZE = 96
_EYE = np.eye(3, dtype=np.float32)


def _has_jitter(preset: AugPreset) -> bool:
    return preset.jitter_p > 0 and max(preset.brightness, preset.contrast, preset.saturation, preset.hue) > 0


def _pick(flag, when_set, otherwise):
    """flag * when_set + (1 - flag) * otherwise for a 0/1 float flag: exactly one of the two."""
    return when_set * flag + otherwise * (1.0 - flag)


def colour_every_view(images, preset: AugPreset, device: str):
    """The colour stage as one brightness/contrast pass and one 3x3 matrix pass over every view,
    the factors being exactly 1 (identity matrix) on views that draw no jitter and the matrix the
    grey projection on grey views: the same views as ``colour_branches`` with fewer operators."""
    out = images
    mat = None
    if _has_jitter(preset):
        apply = fn.cast(_coin(preset.jitter_p), dtype=types.FLOAT)
        if preset.brightness > 0 or preset.contrast > 0:
            b = fn.random.uniform(range=[max(0.0, 1.0 - preset.brightness), 1.0 + preset.brightness])
            c = fn.random.uniform(range=[max(0.0, 1.0 - preset.contrast), 1.0 + preset.contrast])
            out = brightness_contrast(out, _pick(apply, b, 1.0), _pick(apply, c, 1.0), device)
        if preset.saturation > 0 or preset.hue > 0:
            sat, theta = draw_chroma(preset)
            mat = (apply, sat, theta)
    if preset.grayscale_p > 0:
        grey = fn.cast(_coin(preset.grayscale_p), dtype=types.FLOAT)
        if mat is None:
            m = _pick(grey, types.Constant(_chroma_matrices(True)[0]), types.Constant(_EYE))
        else:
            apply, sat, theta = mat
            coloured = _pick(apply, chroma_matrix(sat, theta, False), types.Constant(_EYE))
            greyed = _pick(apply, chroma_matrix(sat, theta, True), types.Constant(_chroma_matrices(True)[0]))
            m = _pick(grey, greyed, coloured)
    elif mat is not None:
        apply, sat, theta = mat
        m = _pick(apply, chroma_matrix(sat, theta, False), types.Constant(_EYE))
    else:
        return out
    return fn.coord_transform(out, M=m, dtype=types.UINT8)


def colour(images, preset: AugPreset, device: str, branches: bool = True):
    """Colour jitter (with p=jitter_p) then grayscale (p=grayscale_p), torchvision semantics.

    With ``branches`` DALI conditionals route each view only through the operators it draws, so
    the per-pixel passes run on the views that need them: jitter on ~jitter_p of them, grey on
    ~grayscale_p (folded into the jitter's colour matrix when both apply); otherwise
    ``colour_every_view``. Grey views are exactly grey either way.
    """
    if not branches:
        return colour_every_view(images, preset, device)
    has_jitter = _has_jitter(preset)
    if not has_jitter and preset.grayscale_p <= 0:
        return images
    # Both draws happen for every sample, whatever branch it takes, so the random streams do
    # not depend on earlier outcomes.
    apply = _coin(preset.jitter_p) if has_jitter else None
    grey = _coin(preset.grayscale_p) if preset.grayscale_p > 0 else None
    if apply is None:
        if grey:
            images = to_grey(images)
        return images
    if grey is None:
        if apply:
            images = jitter(images, preset, device)
        return images
    if apply:
        if grey:
            images = jitter(images, preset, device, grey=True)
        else:
            images = jitter(images, preset, device)
    elif grey:
        images = to_grey(images)
    return images


def run_kernel(op, images, num_draws: int, consts: np.ndarray):
    """One ``pipelines.cpu_kernels`` operator over every view: ``num_draws`` uniforms in [0, 1) per
    view (its randomness) and the preset's constants."""
    draws = fn.random.uniform(range=[0.0, 1.0], shape=[num_draws])
    return op(images, draws, types.Constant(np.float32(consts)))


def colour_fused(images, preset: AugPreset):
    """The colour stage (jitter with p=jitter_p, then grey with p=grayscale_p) of every view as
    one compiled CPU kernel (``pipelines.cpu_kernels``): one pass over the pixels of the views
    that draw a change, a copy for the others. Same distribution as ``colour``."""
    if not _has_jitter(preset) and preset.grayscale_p <= 0:
        return images
    consts = cpu_kernels.colour_constants(preset, _chroma_matrices)
    return run_kernel(cpu_kernels.colour_op(), images, cpu_kernels.N_DRAWS, consts)


def gaussian_taps(sigma, max_sigma: float):
    """Per-sample normalised 1-D Gaussian weights over a fixed 2 * ceil(3 * max_sigma) + 1 window,
    zero outside +-ceil(3 * sigma): the kernel of size 2 * ceil(3 * sigma) + 1 the reference and
    DALI's ``gaussian_blur`` use, padded to one length for the whole batch."""
    half = int(np.ceil(3.0 * max_sigma))
    offsets = types.Constant(np.arange(-half, half + 1, dtype=np.float32))
    inside = fn.cast(dmath.abs(offsets) <= dmath.ceil(3.0 * sigma), dtype=types.FLOAT)
    weights = dmath.exp(offsets * offsets * (-0.5 / (sigma * sigma))) * inside
    return weights / fn.reductions.sum(weights), 2 * half + 1


def separable_blur(images, sigma, max_sigma: float):
    """Gaussian blur as a row then a column pass of DALI's generic filter with reflect-101
    borders (what torchvision pads with); the row pass stays float, so one rounding at the end.
    On the CPU this is ~3x faster than ``fn.gaussian_blur``, which recomputes its windows."""
    taps, n = gaussian_taps(sigma, max_sigma)
    rows = fn.filter(images, fn.reshape(taps, shape=[1, n]), border="reflect_101", dtype=types.FLOAT)
    cols = fn.filter(rows, fn.reshape(taps, shape=[n, 1]), border="reflect_101", dtype=types.FLOAT)
    return fn.cast(cols, dtype=types.UINT8)


def blur_fused(images, preset: AugPreset):
    """The blur stage of every view as one compiled CPU kernel (``pipelines.cpu_kernels``): the
    views that draw a blur (p=blur_p) get torchvision's 2 * ceil(3 sigma) + 1 tap Gaussian, the
    others a copy. Same distribution as ``blur``; no conditional, no fixed-width window."""
    if preset.blur_p <= 0:
        return images
    return run_kernel(cpu_kernels.blur_op(), images, cpu_kernels.BLUR_DRAWS, cpu_kernels.blur_constants(preset))


def blur(images, preset: AugPreset, device: str = "cpu"):
    """Gaussian blur with sigma ~ U(blur_sigma), applied with probability blur_p.

    A DALI conditional routes only the chosen samples through the convolution, whose window is
    2 * ceil(3 * sigma) + 1. The GPU keeps DALI's ``gaussian_blur`` (cheap there).
    """
    if preset.blur_p <= 0:
        return images
    if _coin(preset.blur_p):
        sigma = fn.random.uniform(range=list(preset.blur_sigma))
        if device == "cpu":
            images = separable_blur(images, sigma, preset.blur_sigma[1])
        else:
            images = fn.gaussian_blur(images, sigma=sigma)
    return images


def rand_augment(images, preset: AugPreset, size: int):
    """RandAugment(n, m) with torchvision's conventions (black fill, 150/331 max translation)."""
    if preset.randaugment_n <= 0:
        return images
    # DALI's own suite still calls its deprecated fn.experimental aliases (and forces those
    # warnings on); recording them keeps the log clean, there is nothing for a user to act on.
    with warnings.catch_warnings(record=True):
        return dali_rand_augment.rand_augment(
            images,
            n=preset.randaugment_n,
            m=preset.randaugment_m,
            num_magnitude_bins=preset.randaugment_bins,
            shape=(size, size),
            max_translate_rel=RANDAUG_MAX_TRANSLATE_REL,
            fill_value=0,
        )


def rand_augment_fused(images, preset: AugPreset):
    """RandAugment(n, m) of every view as one compiled CPU kernel (``pipelines.cpu_kernels``):
    torchvision's 14 operations with its uint8 arithmetic (nearest interpolation, black fill)."""
    if preset.randaugment_n <= 0:
        return images
    consts = cpu_kernels.randaugment_constants(preset, RANDAUG_MAX_TRANSLATE_REL)
    return run_kernel(cpu_kernels.randaugment_op(), images, cpu_kernels.RA_DRAWS_PER_OP * preset.randaugment_n, consts)


def check_jigsaw(size: int, grid: int) -> None:
    if grid > 0 and size % grid != 0:
        raise ValueError(
            f"image size {size} is not divisible by the jigsaw grid {grid}: pick image_size a "
            f"multiple of {grid} (e.g. {grid * max(1, round(size / grid))}) or set jigsaw_grid=0"
        )


def jigsaw(images, grid: int, size: int):
    """Cut each size x size image into grid x grid tiles and paste them back in a uniformly random
    order, drawn independently per sample.

    The permutation is the rank of grid*grid random keys; key = random * n + position is never
    tied, so the ranks always form a permutation. ``multi_paste`` with the image given once per
    tile pastes tile t of sample i into sample i at its permuted place (one pass over pixels).
    """
    check_jigsaw(size, grid)
    n = grid * grid
    tile = size // grid
    keys = fn.random.uniform(range=[0, 1 << 20], shape=[n], dtype=types.INT32) * n + types.Constant(
        np.arange(n, dtype=np.int32)
    )
    # rank[i] = number of keys smaller than key[i]
    smaller = fn.reshape(keys, shape=[1, n]) < fn.reshape(keys, shape=[n, 1])
    rank = fn.reductions.sum(fn.cast(smaller, dtype=types.INT32), axes=[1])
    out_anchors = fn.cast(fn.stack((rank // grid) * tile, (rank % grid) * tile, axis=1), dtype=types.INT32)
    positions = np.stack(np.divmod(np.arange(n), grid), axis=1).astype(np.int32) * tile
    return fn.multi_paste(
        *([images] * n),
        in_anchors=types.Constant(positions),
        out_anchors=out_anchors,
        shapes=types.Constant(np.full((n, 2), tile, dtype=np.int32)),
    )


def jigsaw_fused(images, grid: int, size: int):
    """``jigsaw`` as one compiled CPU kernel (``pipelines.cpu_kernels``): a tile permutation drawn
    per view (the order that sorts grid*grid uniform keys), one copy of each tile."""
    check_jigsaw(size, grid)
    return run_kernel(cpu_kernels.jigsaw_op(), images, grid * grid, [grid])


def finish(images, flip_p: float):
    """Horizontal flip with probability flip_p fused with the HWC -> CHW transpose (uint8 out).

    Applied last rather than right after the crop: every stage in between is either pointwise,
    mirror-symmetric (blur kernel, RandAugment's signed magnitudes) or a uniform permutation of
    a symmetric grid (jigsaw), so flipping last yields the same distribution of views.
    """
    mirror = fn.random.coin_flip(probability=flip_p) if flip_p > 0 else 0
    return fn.crop_mirror_normalize(images, mirror=mirror, output_layout="CHW", dtype=types.UINT8)


def view_stages(preset: AugPreset, size: int, device: str, kernels: str | None = None) -> list[tuple[str, object]]:
    """The stages of one view in order, as (name, function of the views): crop, colour, blur,
    RandAugment and jigsaw (when the preset has them), then flip + HWC->CHW. ``kernels`` picks the CPU
    implementation ('numba' or 'dali'; default ``cpu_kernels.backend()``); the GPU always uses
    DALI's operators. ``tools/bench_stages.py`` times the stages one by one."""
    if device == "gpu":
        kernels = "dali"
    elif kernels is None:
        kernels = cpu_kernels.backend()
    if kernels == "numba":
        middle = [
            ("colour", lambda v: colour_fused(v, preset)),
            ("blur", lambda v: blur_fused(v, preset)),
            ("randaugment", lambda v: rand_augment_fused(v, preset)),
        ]
    else:
        middle = [
            ("colour", lambda v: colour(v, preset, device, branches=size >= BRANCH_MIN_SIZE)),
            ("blur", lambda v: blur(v, preset, device)),
            ("randaugment", lambda v: rand_augment(v, preset, size)),
        ]
    if preset.randaugment_n <= 0:
        middle = middle[:2]
    stages = [("crop", lambda v: crop(v, preset, size)), *middle]
    if preset.jigsaw_grid > 0:
        cut = jigsaw_fused if kernels == "numba" else jigsaw
        stages.append(("jigsaw", lambda v: cut(v, preset.jigsaw_grid, size)))
    stages.append(("flip_chw", lambda v: finish(v, preset.flip_p)))
    return stages


def augment_view(images, preset: AugPreset, size: int, device: str):
    """One augmented view (uint8, 3 x size x size) of every decoded image in the batch."""
    view = images
    for _, stage in view_stages(preset, size, device):
        view = stage(view)
    return view


def check_views(views: int) -> None:
    if not isinstance(views, int) or not 1 <= views <= MAX_VIEWS:
        raise ValueError(f"views (K) must be an integer in 1..{MAX_VIEWS}, got {views!r}")


def label_bytes(cls):
    """The ``.cls`` bytes, zero-padded to the longest in the batch: (B, L) uint8 for the host."""
    return fn.pad(cls, fill_value=0, axes=[0])


@pipeline_def(enable_conditionals=True)
def kview_pipeline(
    *,
    tars: list[str],
    idxs: list[str],
    labeled: bool,
    preset: AugPreset,
    views: int,
    size: int,
    device: str,
    shuffle: bool,
    initial_fill: int,
    shard_id: int,
    num_shards: int,
    reader_seed: int,
):
    """Outputs: K views (each a batch of uint8 3 x size x size) and, when labelled, label bytes."""
    encoded, cls = read_shards(
        tars,
        idxs,
        labeled=labeled,
        shuffle=shuffle,
        initial_fill=initial_fill,
        shard_id=shard_id,
        num_shards=num_shards,
        seed=reader_seed,
    )
    images = decode(encoded, device)
    outputs = [augment_view(images, preset, size, device) for _ in range(views)]
    if labeled:
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
):
    """Define (not build) the K-view pipeline; ``device_id`` must be None on the CPU."""
    check_views(views)
    check_jigsaw(size, preset.jigsaw_grid)
    decoder_backend(device)
    if device == "gpu" and device_id is None:
        raise ValueError("device='gpu' needs a device_id (the CUDA device index)")
    if device == "cpu":
        device_id = None  # DALI 2.x: a CPU-only pipeline is one without a device
    with origin_traces_off():
        return kview_pipeline(
            tars=list(tars),
            idxs=list(idxs),
            labeled=labeled,
            preset=preset,
            views=views,
            size=size,
            device=device,
            shuffle=shuffle,
            initial_fill=max(1, int(initial_fill)),
            shard_id=shard_id,
            num_shards=num_shards,
            reader_seed=reader_seed,
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id,
            seed=seed,
            prefetch_queue_depth=prefetch_queue_depth,
        )


__all__ = [
    "MAX_VIEWS",
    "augment_view",
    "blur",
    "build_kview_pipeline",
    "check_jigsaw",
    "check_views",
    "colour",
    "colour_every_view",
    "colour_fused",
    "blur_fused",
    "rand_augment_fused",
    "jigsaw_fused",
    "run_kernel",
    "view_stages",
    "jitter",
    "to_grey",
    "crop",
    "decode",
    "finish",
    "jigsaw",
    "kview_pipeline",
    "rand_augment",
    "read_shards",
]
