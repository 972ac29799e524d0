"""Augmentation fidelity: every DALI path draws its views from the torchvision reference's distribution.

Paths: the CPU pipeline's per-view Numba kernels and the GPU pipeline's graph run on the CPU
(``gpu_graph``: the K views as frames, one operator per stage; its CUDA kernels equal these CPU
kernels bit for bit, ``tests/test_cuda_kernels.py``). Each builds one DALI pipeline over a fixed
set of images (solid colours and textured ones) and is compared with
``pipelines.reference.ViewAugment`` on the same images. Tolerances come from the samples:
two-sample z-tests, |mean_a - mean_b| <= Z * sqrt(sa^2/na + sb^2/nb), Z = 4.5 (a false alarm has
probability ~7e-6 per statistic). Statistics are paired with the original image (a view minus its
source), so the image-to-image spread cancels and only the augmentation's remains.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def

from pipelines import dali as D
from pipelines.kernels import backend as cpu_backend
from pipelines.kernels import randaugment as KR
from pipelines.presets import get_preset
from pipelines.reference import ViewAugment

Z = 4.5
SIZE = 16
# solid colours: saturated primaries and secondaries (hue shifts move whole channels), a skin tone,
# a dark and a light desaturated colour, grey (no hue at all)
SOLIDS = [(255, 0, 0), (0, 200, 0), (30, 60, 230), (240, 220, 20), (200, 150, 120), (40, 25, 60),
          (180, 200, 210), (128, 128, 128)]  # fmt: skip
PATHS = ["numba", "gpu_graph"]
# Views per image and path. Sizing: a z-test of one solid colour compares 256 views a side, so its
# threshold is 4.5 sqrt(2 / 256) = 0.40 of the statistic's per-view SD and a bias of 0.6 SD fails with
# probability 0.99; the textured group (8 images, 2,048 views a side) sees 0.14 SD. The colour test
# makes 126 z-tests a path (9 groups x 7 statistics x 2 moments): a false alarm of 9e-4 a path for a
# correct pipeline (and the pipelines are seeded, so a pass stays a pass). Halving DRAWS would
# let a 0.6 SD bias pass 38% of the time; the module fixtures compute the reference once a module.
DRAWS = 256


def textured(rng: np.random.Generator) -> np.ndarray:
    """Smooth colour fields plus noise: every hue and saturation, edges for the contrast mean."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    phase = rng.uniform(0, 6.28, 3)
    base = 128 + 110 * np.sin(4 * xx[..., None] + 3 * yy[..., None] + phase)
    return np.clip(base + rng.normal(0, 10, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def fidelity_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    solids = [np.full((SIZE, SIZE, 3), c, dtype=np.uint8) for c in SOLIDS]
    return solids + [textured(rng) for _ in range(8)]


def path_usable(path: str) -> None:
    if cpu_backend() != "numba":
        pytest.skip("Numba is not usable here")


def dali_views(images: list[np.ndarray], preset, path: str, *, draws: int, views: int = 2, seed: int = 1):
    """(draws, B, H, W, 3) uint8: ``draws`` views of each of ``images`` from one pipeline (``views``
    views of a batch holding each image draws / views times: DALI's cost is per operator and batch,
    so a wide batch and few views keep the graph small)."""
    reps = draws // views
    batch = reps * len(images)

    @pipeline_def(batch_size=batch, num_threads=2, device_id=None, seed=seed, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: [img for img in images for _ in range(reps)], batch=True, layout="HWC")
        return tuple(D.augment_views(x, preset, SIZE, views, "cpu", path))

    p = pipe()
    p.build()
    out = np.stack([np.stack([np.asarray(t) for t in o]) for o in p.run()])  # (views, B * reps, 3, H, W)
    out = out.reshape(views, len(images), reps, 3, SIZE, SIZE).transpose(0, 2, 1, 4, 5, 3)
    return out.reshape(views * reps, len(images), SIZE, SIZE, 3)


def reference_views(images: list[np.ndarray], preset, *, draws: int, seed: int = 2) -> np.ndarray:
    """(draws, B, H, W, 3) uint8: torchvision's views of each image."""
    augment = ViewAugment(preset, SIZE)
    out = np.empty((draws, len(images), SIZE, SIZE, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny images: intra-op threads only cost hand-offs
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i, img in enumerate(images):
                x = torch.from_numpy(img).permute(2, 0, 1).contiguous()
                for d in range(draws):
                    out[d, i] = augment(x).permute(1, 2, 0).numpy()
    finally:
        torch.set_num_threads(threads)
    return out


def colour_statistics(views: np.ndarray, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per view (views: (N, B, H, W, 3)), paired with its source: the shift of each channel's
    mean, the log ratio of each channel's variance, the chroma (mean |channel - grey|) shift.
    Returns (N, B) arrays."""
    v = views.astype(np.float64)
    src = np.stack(images).astype(np.float64)[None]
    out = {}
    for c, ch in enumerate("RGB"):
        out[f"mean_{ch}"] = v[..., c].mean(axis=(2, 3)) - src[..., c].mean(axis=(2, 3))
        out[f"logvar_{ch}"] = np.log((v[..., c].var(axis=(2, 3)) + 1) / (src[..., c].var(axis=(2, 3)) + 1))

    def chroma(a):
        return np.abs(a - a.mean(axis=-1, keepdims=True)).mean(axis=(2, 3, 4))

    out["chroma"] = chroma(v) - chroma(src)
    return out


def assert_same_distribution(ours: dict, ref: dict, groups: dict[str, slice], what: str) -> None:
    """z-tests on the mean and the second moment of every statistic, per group of images."""
    failures = []
    for group, cols in groups.items():
        for key in ours:
            for power in (1, 2):
                a, b = ours[key][:, cols].ravel() ** power, ref[key][:, cols].ravel() ** power
                se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
                diff = abs(a.mean() - b.mean())
                if diff > Z * se + 1e-9:
                    failures.append(f"{group} {key}^{power}: DALI {a.mean():.3f} vs torchvision {b.mean():.3f} "
                                    f"(n={len(a)}, {len(b)}), |diff| {diff:.3f} > {Z} se {se:.3f}")  # fmt: skip
    assert not failures, f"{what}:\n" + "\n".join(failures)


COLOUR_ONLY = get_preset("strong", crop=False, flip_p=0.0, blur_p=0.0)


@pytest.fixture(scope="module")
def colour_reference():
    """torchvision's colour statistics, computed once for both paths."""
    images = fidelity_images()
    return colour_statistics(reference_views(images, COLOUR_ONLY, draws=DRAWS), images)


@pytest.mark.parametrize("path", PATHS)
def test_colour_stage_matches_torchvision(path, colour_reference):
    """Colour jitter + grayscale of the 'strong' preset (the widest ranges) on solid colours and on
    textured images: every per-view colour statistic, each solid colour on its own, agrees with
    torchvision's ColorJitter + RandomGrayscale within sampling error."""
    path_usable(path)
    images = fidelity_images()
    ours = colour_statistics(dali_views(images, COLOUR_ONLY, path, draws=DRAWS), images)
    ref = colour_reference
    groups = {f"solid {c}": slice(i, i + 1) for i, c in enumerate(SOLIDS)}
    groups["textured"] = slice(len(SOLIDS), None)
    assert_same_distribution(ours, ref, groups, f"{path}: colour stage")


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


# KS critical value at alpha = 1e-5: c(alpha) sqrt((n + m) / (n m)), c = sqrt(-ln(alpha / 2) / 2).
# Sizing: at n = m = DRAWS = 256 it is 0.22, and 24 tests a path (8 colours x 3 channels) give a
# false alarm of 2.4e-4; the null statistic's SD is about 0.023, so two distributions whose CDFs
# are 0.3 apart somewhere (a hue range a third too wide or narrow moves a saturated primary's
# channel that far) fail with probability above 0.99.
KS_C = float(np.sqrt(-np.log(1e-5 / 2) / 2))
HUE_ONLY = get_preset("default", crop=False, flip_p=0.0, blur_p=0.0, jitter_p=1.0, brightness=0.0, contrast=0.0,
                      saturation=0.0, hue=0.1, grayscale_p=0.0)  # fmt: skip


@pytest.fixture(scope="module")
def hue_reference():
    return reference_views(fidelity_images(), HUE_ONLY, draws=DRAWS)


@pytest.mark.parametrize("path", PATHS)
def test_hue_shift_distribution_matches_torchvision(path, hue_reference):
    """Hue jitter alone (+-0.1 of the colour circle) on solid colours: each view is a function of
    the hue factor only, so the whole distribution of each channel's value is compared (KS test),
    per colour. Sensitive to the HSV maths itself: a rotation about the grey axis, or one sector
    of the HSV -> RGB mapping wrong, moves these distributions far beyond the critical value."""
    path_usable(path)
    images = fidelity_images()
    ours = dali_views(images, HUE_ONLY, path, draws=DRAWS)
    failures = []
    for i, colour in enumerate(SOLIDS):
        for c, ch in enumerate("RGB"):
            a, b = ours[:, i, 0, 0, c].astype(float), hue_reference[:, i, 0, 0, c].astype(float)
            d, crit = ks_distance(a, b), KS_C * np.sqrt((len(a) + len(b)) / (len(a) * len(b)))
            if d > crit:
                failures.append(f"solid {colour} {ch}: KS {d:.3f} > {crit:.3f} (DALI mean {a.mean():.1f}, "
                                f"torchvision {b.mean():.1f})")  # fmt: skip
    assert not failures, f"{path}: hue shift\n" + "\n".join(failures)


def whole_view_images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [textured(rng) for _ in range(8)]


@pytest.fixture(scope="module")
def default_reference():
    images = whole_view_images()
    return colour_statistics(reference_views(images, get_preset("default"), draws=DRAWS // 2), images)


@pytest.mark.parametrize("path", PATHS)
def test_whole_views_match_torchvision(path, default_reference):
    """Every stage of 'default' (crop, flip, colour, blur) on textured images: per-view colour and
    contrast statistics agree with the reference's. Sizing: 128 views x 8 images = 1,024 a side in
    one group, 14 z-tests (false alarm 1e-4); a bias of 0.2 of a statistic's SD is the threshold,
    0.3 SD fails with probability 0.99."""
    path_usable(path)
    images = whole_view_images()
    ours = colour_statistics(dali_views(images, get_preset("default"), path, draws=DRAWS // 2), images)
    ref = default_reference
    assert_same_distribution(ours, ref, {"textured": slice(None)}, f"{path}: default views")


def candidates(img: np.ndarray, m: int, bins: int) -> dict[tuple[str, float, bool], np.ndarray]:
    """torchvision's RandAugment operation (op, sign) after an optional flip, the reference order."""
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=1, magnitude=m, num_magnitude_bins=bins)
    out = {}
    for flipped in (False, True):
        x = torch.from_numpy(img[:, ::-1].copy() if flipped else img).permute(2, 0, 1).contiguous()
        for op in KR.RA_OPS:
            magnitudes_fn, signed = ra._AUGMENTATION_SPACE[op]
            mags = magnitudes_fn(bins, SIZE, SIZE)
            for sign in (1.0, -1.0) if signed else (1.0,):
                mag = float(mags[m]) * sign if mags is not None else 0.0
                y = ra._apply_image_or_video_transform(x, op, mag, interpolation=ra.interpolation, fill=ra._fill)
                out[(op, sign, flipped)] = y.permute(1, 2, 0).numpy()
    return out


GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


@pytest.mark.parametrize("path", PATHS)
def test_randaugment_after_the_flip_is_torchvisions_composition(path):
    """Flip then RandAugment(1, 9) through each path (per-view Numba kernels; the GPU graph):
    every view is torchvision's operation
    applied to the (possibly flipped) image, for every one of the 14 operations; a view made in
    the other order (the operation, then the flip) would not match for ShearY, whose shear about
    the top-left corner does not commute with the flip."""
    path_usable(path)
    m, bins = 9, 31
    preset = get_preset("eval", flip_p=0.5, randaugment_n=1, randaugment_m=m)
    img = textured(np.random.default_rng(9))
    views = dali_views([img], preset, path, draws=128)
    cands = candidates(img, m, bins)
    # ShearY: the two orders give different views (else this test could not tell them apart)
    sheared = cands[("ShearY", 1.0, True)]
    other_order = cands[("ShearY", -1.0, False)][:, ::-1]
    assert (sheared != other_order).any(axis=2).mean() > 0.2
    seen = set()
    for view in views.reshape(-1, SIZE, SIZE, 3):
        best, best_bad = None, 2.0
        for key, want in cands.items():
            bad = (view != want).any(axis=2).mean()
            if bad < best_bad:
                best, best_bad = key, bad
        tolerance = 0.01 if best[0] in GEOMETRIC else 0.0  # rounding ties of the sampling grid
        assert best_bad <= tolerance, f"a view matches no (flip, operation): closest {best}, {best_bad:.3f} off"
        seen.add(best[0])
    # Identity and AutoContrast can give the same view (a full-range image): either may be matched.
    # Sizing: each of 128 views draws one of the 14 operations, so a given operation goes unseen with
    # probability (13/14)^128 = 8e-5 (1e-3 for any of the 12 checked); every view is checked exactly.
    assert seen >= set(KR.RA_OPS) - {"Identity", "AutoContrast"}, sorted(set(KR.RA_OPS) - seen)
