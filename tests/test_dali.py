"""pipelines.dali: the augmentation stages on their own (CPU), and the GPU graph's placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def

from ensiam_fast.shards import shard_paths
from pipelines import dali as D
from pipelines import dali_ops as O
from pipelines import fused, kernel_ops
from pipelines.kernels import backend as cpu_backend
from pipelines.kernels.colour_maths import GREY_WEIGHTS
from pipelines.presets import check_jigsaw, check_views, get_preset

SIZE = 32
# Only the stage under test is on; crop=False + resize_ratio 1 leaves a 32x32 image untouched.
IDENTITY = get_preset("eval").replace(name="identity")


def run_once(pipe):
    pipe.build()
    return [np.asarray(out.as_tensor()) for out in pipe.run()]


def binomial_bounds(p: float, n: int, z: float = 4.5) -> tuple[float, float]:
    """p +- z standard errors of a rate over n draws. Sizing (the flip and grey tests: 16 views x 48
    images = 768 draws): z = 4.5 leaves a false alarm of 7e-6 for a correct rate (the pipelines are
    seeded, so a pass stays a pass); the band is +-0.081 at p = 0.5 and +-0.065 at p = 0.2, so a
    rate off by 0.15 or more (a swapped probability, 1 - p, a stage applied twice or never) fails
    with probability above 0.99. Finer errors are the fidelity tests' job (tests/test_fidelity.py)."""
    sd = (p * (1 - p) / n) ** 0.5
    return p - z * sd, p + z * sd


def views_and_reference(root, preset, views: int, batch_size: int = 48, seed: int = 3, kernels: str = "auto"):
    """(reference, views): the un-augmented image (uint8 CHW) and K views from one decode."""
    tars, idxs = shard_paths(root, "train")

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=None, seed=seed, enable_conditionals=True)
    def pipe():
        encoded, _ = D.read_shards(
            tars, idxs, labeled=True, shuffle=False, initial_fill=1, shard_id=0, num_shards=1, seed=seed
        )
        images = D.decode(encoded, "cpu")
        reference = O.to_chw(images)
        return (reference, *D.augment_views(images, preset, SIZE, views, "cpu", kernels))

    outs = run_once(pipe())
    return outs[0], np.stack(outs[1:])  # (B, 3, H, W), (K, B, 3, H, W)


def test_flip_rate_matches_preset(tiny_dataset):
    preset = IDENTITY.replace(flip_p=0.5)
    ref, views = views_and_reference(tiny_dataset, preset, views=16)
    same = (views == ref[None]).all(axis=(2, 3, 4))
    mirrored = (views == ref[None, ..., ::-1]).all(axis=(2, 3, 4))
    assert (same ^ mirrored).all(), "every view is the image or its mirror, nothing else"
    lo, hi = binomial_bounds(0.5, mirrored.size)
    assert lo < mirrored.mean() < hi, mirrored.mean()


def crop_flip_views(flip_p: float, views: int = 8) -> np.ndarray:
    """(K, B, H, W, 3) crop_flip views of 24 smooth images of several sizes, pipeline seed fixed:
    the crop windows depend on the seed and the operator order only, not on flip_p."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:60, 0:80].astype(np.float32)
    images = []
    for i in range(24):
        h, w = 40 + i % 5 * 4, 48 + i % 7 * 4
        a, b, c = rng.uniform(0.05, 0.3, 3)
        img = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(c * (xx + yy))], axis=-1)[:h, :w]
        images.append(np.uint8(127.5 + 127 * img))
    preset = get_preset("default").replace(flip_p=flip_p)

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=11)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return tuple(O.crop_flip(x, preset, SIZE) for _ in range(views))

    return np.stack(run_once(pipe()))


def test_crop_flip_is_the_crop_then_the_flip():
    """One resampling for crop + flip: a flipped view equals the unflipped one mirrored, up to one
    grey level of rounding on a few values; with flip_p=0.5 each view is one or the other, at the
    preset's rate. The stage list of a preset with both uses it."""
    plain = crop_flip_views(0.0)
    assert plain.shape == (8, 24, SIZE, SIZE, 3)
    assert len({v.tobytes() for v in plain.reshape(-1, SIZE * SIZE * 3)}) > 150, "the windows differ"
    mirrored = plain[..., ::-1, :].astype(np.int16)
    flipped = crop_flip_views(1.0).astype(np.int16)
    diff = np.abs(flipped - mirrored)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.002, (diff.max(), (diff > 0).mean())
    assert np.abs(flipped - plain).max() > 50, "flip_p=1 flips"
    half = crop_flip_views(0.5).astype(np.int16)
    near_plain = (np.abs(half - plain) <= 1).all(axis=(2, 3, 4))
    near_mirror = (np.abs(half - mirrored) <= 1).all(axis=(2, 3, 4))
    assert (near_plain ^ near_mirror).all(), "every view is its window or the window mirrored"
    # 8 views x 24 images = 192 draws: the band is +-0.16 around 0.5 (binomial SD 0.036), enough for
    # what this test adds to the flip-rate test above (768 draws through the separate flip stage): the
    # fused stage flips at all and not always (a rate of 0 or 1), or at a rate off by 0.25 (power 0.997).
    lo, hi = binomial_bounds(0.5, near_mirror.size)
    assert lo < near_mirror.mean() < hi, near_mirror.mean()
    names = [name for name, _ in D.view_stages(get_preset("default"), SIZE, "cpu", "numba")]
    assert names[0] == "crop+flip" and "flip" not in names


def numba_usable() -> bool:
    return cpu_backend() == "numba"


@pytest.fixture(params=["gpu_graph", "numba"])
def kernels(request):
    """Run a test through both CPU pipelines: the GPU graph's CPU proxy (K views as frames, one
    operator per stage) and the per-view Numba kernels."""
    if not numba_usable():
        pytest.skip("Numba is not usable here")
    return request.param


def test_grayscale_rate_matches_preset(tiny_dataset, kernels):
    preset = IDENTITY.replace(grayscale_p=0.2)
    ref, views = views_and_reference(tiny_dataset, preset, views=16, kernels=kernels)
    v = views.astype(int)
    grey = (np.abs(v[:, :, 0] - v[:, :, 1]) <= 1).all(axis=(2, 3)) & (np.abs(v[:, :, 1] - v[:, :, 2]) <= 1).all(
        axis=(2, 3)
    )
    untouched = (views == ref[None]).all(axis=(2, 3, 4))
    assert (grey ^ untouched).all(), "a view is either grey or the untouched colour image"
    # the grey views carry torchvision's truncated grey of the source
    luma = np.floor(np.tensordot(np.float32(GREY_WEIGHTS), ref.astype(np.float32), axes=([0], [1])))  # (B, H, W)
    k, b = np.nonzero(grey)
    assert np.abs(v[k, b, 0] - luma[b]).max() <= 1.0
    assert (v[k, b, 0] == v[k, b, 1]).all() and (v[k, b, 1] == v[k, b, 2]).all(), "grey is exact"
    lo, hi = binomial_bounds(0.2, grey.size)
    assert lo < grey.mean() < hi, grey.mean()


def test_views_of_one_image_differ_and_stay_uint8_chw(tiny_dataset, kernels):
    _, views = views_and_reference(tiny_dataset, get_preset("default"), views=4, batch_size=8, kernels=kernels)
    assert views.dtype == np.uint8 and views.shape == (4, 8, 3, SIZE, SIZE)
    for i in range(4):
        for j in range(i + 1, 4):
            assert (views[i] != views[j]).any(axis=(1, 2, 3)).all()


def test_very_strong_views_run(tiny_dataset, kernels):
    """very_strong through both CPU pipelines (gpu_graph: RandAugment and the jigsaw as one fused stage)."""
    _, views = views_and_reference(tiny_dataset, get_preset("very_strong"), views=2, batch_size=8, kernels=kernels)
    assert views.shape == (2, 8, 3, SIZE, SIZE)
    assert (views[0] != views[1]).any(axis=(1, 2, 3)).all()


def tile_grid(image: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid, t, t, C) tiles of an HWC image, row-major."""
    h, w, c = image.shape
    t = h // grid
    return image.reshape(grid, t, grid, t, c).transpose(0, 2, 1, 3, 4).reshape(grid * grid, t, t, c)


def jigsaw_moves(kernels: str, preset, batch: int = 64) -> list[tuple[int, ...]]:
    """Per view of a known 16x16 image (every 4x4 tile its own value), the source tile shown at
    each place (row-major)."""
    grid, size = preset.jigsaw_grid, 16
    t = size // grid
    known = np.repeat(np.repeat(np.arange(grid * grid, dtype=np.uint8).reshape(grid, grid), t, 0), t, 1)
    known = np.stack([known, known + 100, 255 - known], axis=-1)

    @pipeline_def(batch_size=batch, num_threads=2, device_id=None, seed=7, enable_conditionals=True)
    def pipe():
        images = fn.external_source(source=lambda: [known] * batch, batch=True, layout="HWC")
        if kernels == "gpu_graph":  # one frame per sample through the fused stage (no RandAugment: tiles stay whole)
            frames = fn.stack(images, axis=0, axis_name="F")
            return fused.stage(frames, "randaugment_jigsaw", preset.replace(randaugment_n=0), size, 1, "cpu")[0]
        return kernel_ops.jigsaw_stage(images, preset, size)

    (out,) = run_once(pipe())
    src_tiles = tile_grid(known, grid)
    moves = []
    for image in out:
        tiles = tile_grid(image, grid)
        # each output tile is exactly one source tile, and all source tiles are used once
        where = [int(np.flatnonzero((src_tiles == t).all(axis=(1, 2, 3)))[0]) for t in tiles]
        assert sorted(where) == list(range(grid * grid))
        moves.append(tuple(where))
    return moves


def test_jigsaw_modes_permute_tiles_as_documented(kernels):
    """global: a uniform permutation per view; local (DCL's region confusion, k=1): every tile
    moves at most one place along each axis, and some do; jigsaw_p: the share of views cut."""
    from pipelines.reference import jigsaw_order

    grid, batch = 4, 64
    perms = jigsaw_moves(kernels, get_preset("very_strong", jigsaw_grid=grid))
    identity = tuple(range(grid * grid))
    assert sum(p == identity for p in perms) <= 1
    assert len(set(perms)) == batch, "permutations are drawn per sample"
    assert len({p.index(0) for p in perms}) >= 10, "tile 0 lands in many different places"
    assert max(abs(s // grid - d // grid) for p in perms for d, s in enumerate(p)) >= 2  # far moves happen

    local = jigsaw_moves(kernels, get_preset("very_strong", jigsaw_grid=grid, jigsaw_mode="local"), batch)
    ref = [tuple(jigsaw_order(grid, "local", torch.Generator().manual_seed(i)).tolist()) for i in range(batch)]
    for perms_ in (local, ref):
        rows = [abs(s // grid - d // grid) for p in perms_ for d, s in enumerate(p)]
        cols = [abs(s % grid - d % grid) for p in perms_ for d, s in enumerate(p)]
        assert max(rows) == 1 and max(cols) == 1, "local moves stay within one tile along each axis"
    # the same distribution as the reference: share of tiles that moved, two-proportion z-test over
    # 64 x 16 = 1,024 tiles a side. The tiles of one view are not independent (a permutation), so the
    # binomial SE is approximate; z = 4.5 leaves room for that. The SE of the difference is about
    # 0.022, so a local mode moving 15 points more or fewer tiles than the reference fails (power 0.99).
    a = np.array([s != d for p in local for d, s in enumerate(p)], dtype=float)
    b = np.array([s != d for p in ref for d, s in enumerate(p)], dtype=float)
    assert abs(a.mean() - b.mean()) <= 4.5 * np.sqrt(a.var() / len(a) + b.var() / len(b))

    # jigsaw_p = 0.5 over 256 views (binomial SD 0.031, band +-0.14): catches a cut that never or always
    # happens, and one drawn twice per view (a rate of 0.25 or 0.75) with probability 0.9999; at the
    # 64 views above the band would be +-0.28 and miss that. A wide batch costs a few milliseconds.
    cuts = 256
    half = jigsaw_moves(kernels, get_preset("very_strong", jigsaw_grid=grid, jigsaw_p=0.5), cuts)
    lo, hi = binomial_bounds(0.5, cuts)
    assert lo < np.mean([p != identity for p in half]) < hi


def test_jigsaw_and_views_reject_bad_arguments():
    with pytest.raises(ValueError, match="not divisible by the jigsaw grid 4"):
        check_jigsaw(30, 4)
    check_jigsaw(30, 0)
    for bad in (0, 17, 2.0):
        with pytest.raises(ValueError, match=r"views \(K\) must be an integer in 1\.\.16"):
            check_views(bad)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'gpu'"):
        D.decoder_backend("tpu")
    with pytest.raises(ValueError, match="jigsaw_mode must be one of global, local, got 'tiles'"):
        get_preset("very_strong", jigsaw_mode="tiles")
    with pytest.raises(ValueError, match="jigsaw_p must be a probability"):
        get_preset("very_strong", jigsaw_p=1.5)


def test_cpu_kernels_config_key_reaches_the_pipeline(tiny_dataset):
    """data.cpu_kernels from the config to the DALI loader: a bad name fails when the loader is
    built, naming the key's choices; 'gpu_graph' runs the GPU graph's CPU proxy."""
    from ensiam_fast.config import load_config
    from ensiam_fast.data import build_loader
    from ensiam_fast.errors import ConfigError

    cfg = load_config("demo", ["data.cpu_kernels=gpu_graph"])
    loader = build_loader(tiny_dataset, "train", batch_size=8, views=2, preset="default", num_threads=1,
                          cpu_kernels=cfg.data.cpu_kernels)  # fmt: skip
    assert loader.cpu_kernels == "gpu_graph"
    x, _ = next(iter(loader))
    assert x.shape == (2, 8, 3, SIZE, SIZE)
    with pytest.raises(ConfigError, match=r"data\.cpu_kernels='fast' is not one of"):
        load_config("demo", ["data.cpu_kernels=fast"])
    with pytest.raises(ValueError, match="cpu_kernels must be one of auto, numba, gpu_graph, got 'fast'"):
        build_loader(tiny_dataset, "train", batch_size=8, views=2, preset="default", cpu_kernels="fast")


@pytest.mark.parametrize("preset", ["default", "very_strong", "eval"])
def test_gpu_pipeline_graph_builds_on_the_gpu(tiny_dataset, preset):
    """Without a GPU DALI cannot instantiate a GPU pipeline, but the Python graph (every operator,
    its placement) can be built: the views come out on the GPU, the label bytes on the CPU."""
    tars, idxs = shard_paths(tiny_dataset, "train")
    pipe = D.build_kview_pipeline(
        tars, idxs, labeled=True, preset=get_preset(preset), views=2, size=SIZE, batch_size=8,
        device="gpu", device_id=0,
    )  # fmt: skip
    pipe._build_graph()  # private, but the only way to trace a GPU graph on a CPU-only host
    placement = [node.device for node in pipe._graph_outputs]
    assert placement == ["gpu", "gpu", "cpu"]
    with pytest.raises(ValueError, match="needs a device_id"):
        D.build_kview_pipeline(tars, idxs, labeled=True, preset=get_preset(preset), views=1, size=SIZE,
                               batch_size=8, device="gpu")  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipeline_runs(tiny_dataset):
    tars, idxs = shard_paths(tiny_dataset, "train")
    pipe = D.build_kview_pipeline(
        tars, idxs, labeled=True, preset=get_preset("very_strong"), views=2, size=SIZE, batch_size=8,
        device="gpu", device_id=0,
    )  # fmt: skip
    pipe.build()
    outs = pipe.run()
    assert np.asarray(outs[0].as_cpu().as_tensor()).shape == (8, 3, SIZE, SIZE)


def test_origin_traces_are_off_while_defining_and_restored_after(tiny_dataset):
    from nvidia.dali._utils import dali_trace

    tars, idxs = shard_paths(tiny_dataset, "train")
    seen = []
    with D.origin_traces_off():
        seen.append(dali_trace.is_tracing_enabled())
        with D.origin_traces_off():  # nested (as two threads defining at once) keeps it off
            seen.append(dali_trace.is_tracing_enabled())
        seen.append(dali_trace.is_tracing_enabled())
    assert seen == [False, False, False]
    assert dali_trace.is_tracing_enabled()  # DALI's own default again
    D.build_kview_pipeline(tars, idxs, labeled=True, preset=get_preset("default"), views=1, size=SIZE, batch_size=4)
    assert dali_trace.is_tracing_enabled()


def test_colour_modes_agree_on_what_jitter_and_grey_do(tiny_dataset, kernels):
    """Every colour implementation: views without jitter or grey are untouched, grey ones exact,
    and the share of changed views is 1 - (1 - jitter_p)(1 - grayscale_p)."""
    preset = IDENTITY.replace(jitter_p=0.5, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.2)
    ref, views = views_and_reference(tiny_dataset, preset, views=16, kernels=kernels)
    changed = (views != ref[None]).any(axis=(2, 3, 4))
    grey = (views[:, :, 0] == views[:, :, 1]).all(axis=(2, 3)) & (views[:, :, 1] == views[:, :, 2]).all(axis=(2, 3))
    # 768 draws (see binomial_bounds): the changed share 0.6 has a band of +-0.08, the grey share 0.2
    # +-0.065; jitter never or always applied (0.2 or 1.0), grey at 1 - p, or grey only inside the
    # jitter branch (0.1, power 0.999) all fail.
    lo, hi = binomial_bounds(1 - 0.5 * 0.8, changed.size)
    assert lo < changed.mean() < hi, (kernels, changed.mean())
    lo, hi = binomial_bounds(0.2, grey.size)
    assert lo < grey.mean() < hi, (kernels, grey.mean())


def test_gpu_memory_guard_names_preset_batch_and_need():
    """data.gpu_memory_gb: the imagenet preset's batch (256 x 4 views at 224) fits the 6 GB the
    imagenet config allows; sixteen times that batch does not, and the refusal names the preset, the
    batch and the projected need; the projection grows with the stages a preset has."""
    from pipelines.presets import check_gpu_memory, pipeline_bytes

    for name in ("default", "very_strong"):
        check_gpu_memory(get_preset(name), 224, 256, 4, 6.0)
        check_gpu_memory(get_preset(name), 224, 10**6, 4, None)  # no limit set: no check
    with pytest.raises(ValueError, match=r"data.preset='very_strong' at 224x224 with a batch of 4096 images x 4 "
                                         r"views per GPU projects \d+\.\d GB .* data.gpu_memory_gb=6"):  # fmt: skip
        check_gpu_memory(get_preset("very_strong"), 224, 4096, 4, 6.0)
    default, strong = (pipeline_bytes(get_preset(n), 224, 256, 4) for n in ("default", "very_strong"))
    assert default < strong <= 1.5 * default


@pytest.mark.slow  # four GPU graphs traced
@pytest.mark.parametrize("preset, most", [("default", 60), ("very_strong", 100)])
def test_gpu_graph_is_a_few_operators_whatever_k(tiny_dataset, preset, most):
    """The GPU graph traced as ``tools/bench_gpu_graph.py`` counts it: each fused stage is one
    operator for all K views, so going from K=2 to K=8 adds only the crop's resize and the slice
    handing out each view (two GPU operators a view), and K=8 stays within the issue's budget."""
    tars, idxs = shard_paths(tiny_dataset, "train")

    def gpu_ops(views: int) -> int:
        pipe = D.build_kview_pipeline(tars, idxs, labeled=True, preset=get_preset(preset), views=views, size=SIZE,
                                      batch_size=8, device="gpu", device_id=0)  # fmt: skip
        pipe._build_graph()
        return sum(op._op.device == "gpu" for op in pipe._ops)

    two, eight = gpu_ops(2), gpu_ops(8)
    assert eight - two == 2 * 6, (two, eight)
    assert eight <= most, eight
