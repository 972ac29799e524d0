"""pipelines.kernels: the fused colour kernel against the colour maths written out in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

from pipelines import kernel_ops, kernels
from pipelines.kernels import blur as KB
from pipelines.kernels import colour as KC
from pipelines.kernels import randaugment as KR
from pipelines.presets import get_preset

pytestmark = pytest.mark.skipif(kernels.backend() != "numba", reason="Numba is not usable here")


def torchvision_colour(img: np.ndarray, draws: np.ndarray, preset) -> np.ndarray:
    """The colour stage with torchvision's own functions, for the factors and order ``draws`` encode
    (the layout ``pipelines.kernels.colour`` documents)."""
    import torch
    import torchvision.transforms.v2.functional as TF

    x = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    if draws[0] < preset.jitter_p:
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in np.argsort(draws[5:9]):
            lo, hi, on = KC.factor_ranges(preset)[op]
            if on:
                x = ops[op](x, float(np.float32(lo + draws[1 + op] * (hi - lo))))
    if draws[9] < preset.grayscale_p:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    return x.permute(1, 2, 0).numpy()


def run_kernel(images, draws, preset, op=None, consts=None):
    op = op or kernel_ops.numba_op("colour", KC._entry)
    consts = KC.colour_constants(preset) if consts is None else consts

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=0)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        d = fn.external_source(source=lambda: list(draws), batch=True)
        return op(x, d, types.Constant(consts))

    p = pipe()
    p.build()
    return [np.asarray(t) for t in p.run()[0]]


@pytest.mark.parametrize("name", ["default", "strong"])
def test_colour_kernel_matches_torchvision(name):
    """Every view equals torchvision's ColorJitter + RandomGrayscale for the same factors and order,
    bit for bit, on random and on solid colour images; pure red at hue +0.1 is torchvision's
    (255, 153, 0)."""
    preset = get_preset(name)
    rng = np.random.default_rng(0)
    n = 48
    images = [rng.integers(0, 256, (9 + i % 3, 11, 3), dtype=np.uint8) for i in range(n // 2)]
    images += [np.full((8, 8, 3), rng.integers(0, 256, 3), dtype=np.uint8) for _ in range(n // 2)]
    draws = rng.uniform(0, 1, (n, KC.N_DRAWS)).astype(np.float32)
    # cover every branch: untouched, jitter only, grey only, jitter then grey
    draws[0, [0, 9]] = [0.99, 0.99]
    draws[1, [0, 9]] = [0.10, 0.99]
    draws[2, [0, 9]] = [0.99, 0.05]
    draws[3, [0, 9]] = [0.10, 0.05]
    out = run_kernel(images, draws, preset)
    for i in range(n):
        want = torchvision_colour(images[i], draws[i], preset).astype(int)
        assert out[i].shape == images[i].shape and out[i].dtype == np.uint8
        diff = np.abs(out[i].astype(int) - want)
        assert diff.max() == 0, (i, draws[i], diff.max(), (diff > 0).mean())
    assert (out[0] == images[0]).all(), "a view that draws neither jitter nor grey is untouched"
    for i in (2, 3):
        assert (out[i][..., 0] == out[i][..., 1]).all() and (out[i][..., 1] == out[i][..., 2]).all()
    # hue only, +0.1 of the circle, on pure red (the example)
    red = get_preset(name).replace(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.1, jitter_p=1.0, grayscale_p=0.0)
    d = np.float32([[0.0, 0.5, 0.5, 0.5, 1.0, 0.1, 0.2, 0.3, 0.4, 0.9]])
    (shifted,) = run_kernel([np.full((4, 4, 3), (255, 0, 0), dtype=np.uint8)], d, red)
    assert tuple(shifted[0, 0]) == (255, 153, 0), tuple(shifted[0, 0])


@pytest.mark.parametrize("op", ["hue", "saturation", "brightness", "contrast", "grey"])
def test_colour_operations_equal_torchvisions_on_a_million_colours(op):
    """Each colour operation of the kernels (the table, one-pass and branch-free forms included)
    equals torchvision's v2 function bit for bit on 2^20 random colours plus every grey level."""
    import torch
    import torchvision.transforms.v2.functional as TF

    from pipelines.kernels import colour_maths as CM

    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    img[0, :256] = np.arange(256, dtype=np.uint8)[:, None]
    x = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    out = np.empty_like(img)
    for f in (0.37, 1.61) if op != "hue" else (-0.41, 0.1, 0.5):
        if op == "hue":
            want, _ = TF.adjust_hue(x, f), CM.hue_shift_to(out, img, np.float32(f))
        elif op == "saturation":
            want, _ = TF.adjust_saturation(x, f), CM.saturate_to(out, img, np.float64(f))
        elif op == "brightness":
            want, _ = TF.adjust_brightness(x, f), CM.blend_to(out, img, np.zeros((1, 1), np.float32), np.float64(f))
        elif op == "contrast":
            want, _ = TF.adjust_contrast(x, f), CM.blend_to(out, img, CM.mean_grey(img), np.float64(f))
        else:
            want, _ = TF.rgb_to_grayscale(x, num_output_channels=3), CM.grey_to(out, img)
        mismatched = int((out != want.permute(1, 2, 0).numpy()).sum())
        assert mismatched == 0, (op, f, mismatched)


@pytest.mark.parametrize("size, sigma", [(32, 2.0), (32, 0.1), (64, 1.1), (20, 3.0), (224, 1.7)])
def test_blur_kernel_matches_torchvision(size, sigma):
    """Applied blurs equal torchvision's GaussianBlur with its 2 * ceil(3 sigma) + 1 taps (up to a
    rare off-by-one where float sums round the other way); unapplied views are copies."""
    import math

    import torch
    import torchvision.transforms.v2.functional as TF

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8) for _ in range(6)]
    draws = np.float32([[0.2, 0.5]] * 5 + [[0.9, 0.5]])  # the last one draws no blur (p = 0.5)
    consts = np.float32([0.5, sigma, sigma])
    out = run_kernel(images, draws, None, op=kernel_ops.numba_op("blur", KB._entry), consts=consts)
    kernel = 2 * math.ceil(3 * sigma) + 1
    for img, got in zip(images[:5], out[:5]):
        want = TF.gaussian_blur(torch.from_numpy(img).permute(2, 0, 1), [kernel, kernel], [sigma, sigma])
        diff = np.abs(got.astype(int) - want.permute(1, 2, 0).numpy().astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (sigma, diff.max(), (diff > 0).mean())
    assert (out[5] == images[5]).all()


def test_backend_choice_is_the_config_value():
    assert kernels.backend("gpu_graph") == "gpu_graph"
    assert kernels.backend("numba") == "numba"
    assert kernels.backend("auto") == "numba"
    with pytest.raises(ValueError, match="cpu_kernels must be one of auto, numba, gpu_graph, got 'fast'"):
        kernels.backend("fast")


def smooth_image(rng, h: int, w: int) -> np.ndarray:
    """A photo-like uint8 image in [30, 220]: smooth colour fields plus a little noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 6.28, 3)
    base = 125 + 80 * np.sin(3 * xx[..., None] + 2 * yy[..., None] + phase)
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 30, 220).astype(np.uint8)


@pytest.mark.parametrize("op", KR.RA_OPS)
def test_randaugment_operations_match_torchvision(op):
    """Each operation, both signs, against torchvision's own RandAugment operation on the same
    image: pixel and colour operations exactly, geometric ones up to the few pixels whose sampling
    point sits on a rounding tie (float32 grid arithmetic in a different order)."""
    import torch
    from torchvision.transforms import v2

    m, bins = 5, 31
    ra = v2.RandAugment(num_ops=1, magnitude=m, num_magnitude_bins=bins)
    rng = np.random.default_rng(3)
    images = [smooth_image(rng, 32, 32), smooth_image(rng, 40, 56)]
    index = KR.RA_OPS.index(op)
    consts = np.float32([1, m, bins, KR.MAX_TRANSLATE_REL])
    for sign_draw, sign in ((0.9, 1.0), (0.1, -1.0)):
        draws = np.float32([[(index + 0.5) / len(KR.RA_OPS), sign_draw]] * len(images))
        out = run_kernel(images, draws, None, op=kernel_ops.numba_op("randaugment", KR._entry), consts=consts)
        for img, got in zip(images, out):
            h, w = img.shape[:2]
            magnitudes_fn, signed = ra._AUGMENTATION_SPACE[op]
            mags = magnitudes_fn(bins, h, w)
            magnitude = float(mags[m]) * (sign if signed else 1.0) if mags is not None else 0.0
            want = (
                ra._apply_image_or_video_transform(
                    torch.from_numpy(img).permute(2, 0, 1), op, magnitude, interpolation=ra.interpolation, fill=ra._fill
                )
                .permute(1, 2, 0)
                .numpy()
            )
            diff = np.abs(got.astype(int) - want.astype(int))
            assert got.shape == img.shape and got.dtype == np.uint8
            if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
                assert (diff.max(axis=2) > 0).mean() < 0.01, (op, sign, (diff.max(axis=2) > 0).mean())
            else:
                assert diff.max() == 0, (op, sign, diff.max(), (diff > 0).mean())
            if op != "Identity" and op != "AutoContrast":
                assert (got != img).any(), f"{op} changed nothing"


def test_randaugment_magnitude_conventions():
    """M=5 is a bin of randaugment_bins: 1/6 of the maximum rotation (5 degrees) on torchvision's 31
    bins, half of it (15 degrees) on the original 0..10 scale (randaugment_bins=11)."""
    import torch
    import torchvision.transforms.v2.functional as TF

    img = smooth_image(np.random.default_rng(4), 24, 24)
    rotate = (KR.RA_OPS.index("Rotate") + 0.5) / len(KR.RA_OPS)
    for bins, degrees in ((31, 5.0), (11, 15.0)):
        preset = get_preset("very_strong", randaugment_n=1, randaugment_m=5, randaugment_bins=bins)
        out = run_kernel([img], np.float32([[rotate, 0.9]]), None, op=kernel_ops.numba_op("randaugment", KR._entry),
                         consts=KR.randaugment_constants(preset))[0]  # fmt: skip
        want = TF.rotate(torch.from_numpy(img).permute(2, 0, 1), degrees).permute(1, 2, 0).numpy()
        assert (np.abs(out.astype(int) - want).max(axis=2) > 0).mean() < 0.01, bins
    with pytest.raises(ValueError, match="randaugment_m=11 must be a bin in 0..10"):
        get_preset("very_strong", randaugment_m=11, randaugment_bins=11)


def test_a_kernel_first_made_with_dali_tracing_off_runs_with_it_on():
    """The operator objects are shared process-wide; the first one may be made while a pipeline is
    defined with DALI's origin tracing off (the trainer's loader does that). A later definition with
    tracing on (DALI's default: evaluation, a preview, a user's own pipeline) must still run it."""
    from nvidia.dali._utils import dali_trace

    from pipelines.dali import origin_traces_off

    assert dali_trace.is_tracing_enabled()
    with origin_traces_off():
        op = kernel_ops.numba_op("colour-made-with-tracing-off", KC._entry)
    assert dali_trace.is_tracing_enabled()
    images = [np.full((6, 6, 3), 200, dtype=np.uint8)] * 2
    draws = np.float32([[0.99] * KC.N_DRAWS] * 2)  # neither jitter nor grey: views come back unchanged
    out = run_kernel(images, draws, get_preset("default"), op=op)
    assert all((o == i).all() for o, i in zip(out, images))


def test_chw_kernel_equals_dalis_transpose():
    """The final HWC -> CHW kernel gives exactly DALI's ``fn.transpose`` on views of several shapes,
    and the CPU view stages end with it (the layout views leave the pipeline in: CHW)."""
    from pipelines import dali as D

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(7, 5, 3), (32, 32, 3), (224, 160, 3)]]

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=0)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return kernel_ops.chw_stage(x), fn.transpose(x, perm=[2, 0, 1], output_layout="CHW")

    p = pipe()
    p.build()
    ours, dalis = p.run()
    assert ours.layout() == "CHW"
    for i, img in enumerate(images):
        a, b = np.asarray(ours[i]), np.asarray(dalis[i])
        assert a.shape == (3, *img.shape[:2]) and (a == b).all() and (a == img.transpose(2, 0, 1)).all()
    assert D.view_stages(get_preset("default"), 32, "cpu", "numba")[-1] == ("chw", kernel_ops.chw_stage)
    with pytest.raises(ValueError, match="use augment_views"):  # the GPU graph has no per-view stages
        D.view_stages(get_preset("default"), 32, "cpu", "gpu_graph")


def test_crop_kernel_resamples_as_torchvision():
    """The crop kernel, run by DALI on the windows DALI draws (and on planted ones: the whole image,
    a thin strip, an upscale), equals torchvision's ``resized_crop(..., antialias=True)`` of the same
    window to within one level (on under 2% of values downscaling, 5% upscaling), mirrored exactly
    where the view is flagged; both flags occur, and the CPU stage list uses it for crop + flip."""
    import torch
    import torchvision.transforms.v2.functional as TF

    from pipelines import dali as D

    rng = np.random.default_rng(5)
    images = [smooth_image(rng, h, w) for h, w in [(75, 100), (64, 64), (120, 90)] * 6]
    planted = np.float32([[0, 0, 75, 100, 0], [3, 40, 60, 9, 1], [50, 30, 12, 17, 0]])
    preset = get_preset("default")

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=7)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        drawn = kernel_ops.crop_windows(x, preset, flip=True)
        fixed = fn.external_source(source=lambda: [planted[i % 3] for i in range(len(images))], batch=True)
        return drawn, kernel_ops.crop_resample(x, drawn, 48), kernel_ops.crop_resample(x, fixed, 48)

    p = pipe()
    p.build()
    drawn, views, planted_views = (list(map(np.asarray, out)) for out in p.run())
    windows = drawn + [planted[i % 3] for i in range(len(images))]
    flags = [w[4] for w in windows]
    assert 0 < sum(flags[: len(images)]) < len(images), "some drawn views are mirrored, some not"
    for img, window, ours in zip(images * 2, windows, views + planted_views, strict=True):
        top, left, h, w, mirror = (int(v) for v in window)
        assert 0 <= top and top + h <= img.shape[0] and 0 <= left and left + w <= img.shape[1]
        x = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        ref = TF.resized_crop(x, top, left, h, w, [48, 48], antialias=True).permute(1, 2, 0).numpy()
        if mirror:
            ref = ref[:, ::-1]
        diff = np.abs(ours.astype(np.int16) - ref)
        # torchvision sums with 15-bit fixed-point weights, the kernel in float32: values whose sum
        # lies within that rounding of a half level come out one apart (more often upscaling)
        share = 0.02 if min(h, w) >= 48 else 0.05
        assert ours.shape == (48, 48, 3) and diff.max() <= 1 and (diff > 0).mean() < share, (window, diff.max())
    names = [name for name, _ in D.view_stages(preset, 48, "cpu", "numba")]
    assert names[0] == "crop+flip"
