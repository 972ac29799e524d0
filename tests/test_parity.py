"""DALI (ensiam_fast.data, backend dali) and the torchvision reference agree statistically.

Tolerances come from the samples: two-sample z-tests, |mean_a - mean_b| <= Z * sqrt(sa^2/na + sb^2/nb),
with Z = 4.5 (a false alarm has probability ~7e-6 per statistic, ~2e-4 over all statistics here).
The data iterate whole epochs on both sides, so every image contributes the same number of views
to each backend and only the augmentation differs.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from ensiam_fast.data.torch import build_reference_loader
from ensiam_fast.shards import Manifest, SplitInfo, shard_name, write_manifest, write_shard
from pipelines.presets import get_preset

Z = 4.5
SOURCE = 128  # coordinate images are SOURCE x SOURCE; views are VIEW x VIEW
VIEW = 32
NO_COLOUR = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, randaugment_n=0, jigsaw_grid=0)
PRESETS = ["default", "strong", "very_strong"]


def dali_loader_or_skip():
    try:
        from ensiam_fast.data import build_loader, dali_available
    except ImportError as e:
        pytest.skip(f"ensiam_fast.data (the DALI loader) is not importable yet: {e}")
    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed on this host")
    return build_loader


def loader(backend, root, preset, *, views, batch, seed):
    kw = dict(batch_size=batch, views=views, preset=preset, seed=seed, num_threads=2, device="cpu")
    if backend == "torch":
        return build_reference_loader(root, "train", **kw)
    return dali_loader_or_skip()(root, "train", backend="dali", **kw)


def collect_views(backend, root, preset, *, epochs, views=2, batch=16, seed=0) -> torch.Tensor:
    """All views of ``epochs`` epochs as (N, 3, H, W) uint8."""
    ld = loader(backend, root, preset, views=views, batch=batch, seed=seed)
    out = []
    for epoch in range(epochs):
        ld.set_epoch(epoch)
        out.extend(x.flatten(0, 1) for x, _ in ld)
    return torch.cat(out)


def assert_same_mean(a: np.ndarray, b: np.ndarray, what: str, slack: float = 0.0):
    """Two-sample z-test on the means of per-view statistics ``a`` and ``b`` (1-D)."""
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    diff = abs(a.mean() - b.mean())
    assert diff <= Z * se + slack, (
        f"{what}: DALI {a.mean():.4f} vs reference {b.mean():.4f} (n={len(a)}, {len(b)}), "
        f"|diff| {diff:.4f} > {Z} x se {se:.4f} + {slack}"
    )


# --------------------------------------------------------------------------- crop area via coordinates


def coordinate_image() -> np.ndarray:
    """R encodes x, G encodes y (2 levels per source pixel), B constant: a view's local slope in
    R and G tells how many source pixels one view pixel spans, so the crop's sides."""
    ramp = (np.arange(SOURCE) * 2).astype(np.uint8)
    img = np.empty((SOURCE, SOURCE, 3), dtype=np.uint8)
    img[..., 0] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    img[..., 2] = 128
    return img


@pytest.fixture(scope="module")
def coordinate_dataset(tmp_path_factory):
    """64 identical lossless (PNG) coordinate images, labelled 0."""
    root = tmp_path_factory.mktemp("coords")
    buf = io.BytesIO()
    Image.fromarray(coordinate_image()).save(buf, format="PNG")
    samples = [(f"c_{i:04d}", {"png": buf.getvalue(), "cls": b"0"}) for i in range(64)]
    rec = write_shard(root / shard_name("train", 0), samples)
    info = SplitInfo(num_samples=64, shards=[rec.name], labeled=True, shard_sizes=[64])
    write_manifest(root, Manifest(dataset="coords", classes=["c"], splits={"train": info}, image_size=[VIEW, VIEW]))
    return root


def crop_area_proxy(views: torch.Tensor) -> np.ndarray:
    """Fraction of the source area each view was cropped from, read from the coordinate ramps.

    Interior pixels only (columns/rows 8 and 24), so border handling of the resampling filter
    does not enter: a crop cw source pixels wide gives an R slope of 2 * cw / VIEW per view pixel.
    """
    v = views.to(torch.float64)
    lo, hi = VIEW // 4, 3 * VIEW // 4
    slope_x = (v[:, 0, :, hi] - v[:, 0, :, lo]).abs().mean(dim=1) / (hi - lo)  # flips: abs
    slope_y = (v[:, 1, hi, :] - v[:, 1, lo, :]).mean(dim=1) / (hi - lo)
    width = slope_x * VIEW / 2
    height = slope_y * VIEW / 2
    return (width * height / SOURCE**2).numpy()


def expected_crop_area(preset, draws: int = 20000) -> tuple[float, float]:
    """Mean and sd of torchvision's RandomResizedCrop area fraction on a SOURCE x SOURCE image."""
    rrc = v2.RandomResizedCrop(VIEW, scale=preset.crop_scale, ratio=preset.crop_ratio)
    dummy = torch.zeros(1, SOURCE, SOURCE)
    torch.manual_seed(0)
    areas = np.array([(lambda p: p["height"] * p["width"])(rrc.make_params([dummy])) for _ in range(draws)])
    areas = areas / SOURCE**2
    return float(areas.mean()), float(areas.std())


# Each side of the proxy is read to about +-1 source pixel (integer rounding of two interior
# samples over 16 view pixels), a relative error of at most ~2/57 per side for the smallest crops,
# unbiased on average; allow that as a systematic slack on the area fraction.
PROXY_SLACK = 0.01


def test_crop_area_proxy_measures_torchvision_crops(coordinate_dataset):
    preset = get_preset("default", **NO_COLOUR)
    areas = crop_area_proxy(collect_views("torch", coordinate_dataset, preset, epochs=3))
    mean, sd = expected_crop_area(preset)
    # Sizing: 384 crops; the area fraction's SD is about 0.25, so 4.5 SE is 0.06 (plus the proxy's
    # slack): a proxy reading the sides 10% long or short (area off by a fifth, ~0.11) fails. The
    # 20,000 reference draws put the reference's own SE at 0.002, a tenth of this test's.
    assert len(areas) == 3 * 2 * 64
    se = sd / np.sqrt(len(areas))
    assert abs(areas.mean() - mean) <= Z * se + PROXY_SLACK, (areas.mean(), mean, se)
    # the full scale range shows up: small and whole-image crops both occur
    assert areas.min() < 0.3 and areas.max() > 0.85


def test_full_view_of_the_coordinate_image_reads_area_one(coordinate_dataset):
    preset = get_preset("default", **NO_COLOUR, crop=False, flip_p=0.0)
    areas = crop_area_proxy(collect_views("torch", coordinate_dataset, preset, epochs=1))
    assert np.allclose(areas, 1.0, atol=0.03)


@pytest.mark.parametrize("name", PRESETS)
def test_dali_crop_area_matches_reference(coordinate_dataset, name):
    preset = get_preset(name, **NO_COLOUR)
    # 2 epochs x 64 images x 16 views = 2048 crops per backend: the SE of the difference is 0.008,
    # so the threshold is 0.035 + 0.01 slack and a 0.06 shift in mean area fails with probability 0.97
    dali = crop_area_proxy(collect_views("dali", coordinate_dataset, preset, epochs=2, views=16, batch=32))
    ref = crop_area_proxy(collect_views("torch", coordinate_dataset, preset, epochs=2, views=16, batch=32))
    assert len(dali) == len(ref) == 2048
    assert_same_mean(dali, ref, f"{name}: mean crop area fraction", slack=PROXY_SLACK)
    assert_same_mean(dali**2, ref**2, f"{name}: second moment of the crop area", slack=2 * PROXY_SLACK)


# --------------------------------------------------------------------------- colour statistics


@pytest.fixture(scope="module")
def indexed_dataset(tmp_path_factory):
    """48 tiny 32x32 images whose label is their index, so each view finds its original."""
    from conftest import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("indexed"), {"train": (48, True)}, num_classes=48)


def collect_labelled_views(backend, root, preset, *, epochs, views, seed):
    ld = loader(backend, root, preset, views=views, batch=16, seed=seed)
    xs, ys = [], []
    for epoch in range(epochs):
        ld.set_epoch(epoch)
        for x, y in ld:
            xs.append(x.flatten(0, 1))
            ys.append(y.repeat(x.shape[0]))  # x.flatten(0, 1) is view-major: view k of all B, then k+1
    return torch.cat(xs), torch.cat(ys)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: channel means (N, 3), channel variances (N, 3), mean |channel - grey| (N,)."""
    v = images.to(torch.float64).flatten(2)
    return v.mean(dim=2), v.var(dim=2), (v - v.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2))


def view_residuals(views: torch.Tensor, labels: torch.Tensor, originals: torch.Tensor) -> dict[str, np.ndarray]:
    """Per view, how far augmentation moved it from its own original: the image-to-image spread
    cancels (paired design), leaving the augmentation's spread, so the z-tests are sharp."""
    vm, vv, vc = channel_stats(views)
    om, ov, oc = channel_stats(originals[labels])
    out = {}
    for c, ch in enumerate("RGB"):
        out[f"d_mean_{ch}"] = (vm[:, c] - om[:, c]).numpy()
        out[f"d_logvar_{ch}"] = torch.log((vv[:, c] + 1) / (ov[:, c] + 1)).numpy()
    out["d_chroma"] = (vc - oc).numpy()
    # grey views count how often grayscale was applied: a sharp check of grayscale_p (no later op
    # puts colour back). Grey means every pixel's channels within 1 (coloured views are far off).
    spread = views.amax(dim=1).to(torch.int16) - views.amin(dim=1).to(torch.int16)
    out["grey"] = (spread <= 1).flatten(1).all(dim=1).double().numpy()
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_dali_view_colour_statistics_match_reference(indexed_dataset, name):
    # the originals: evaluation views at the native size are the decoded images, in label order
    originals = torch.cat(
        [
            x[0]
            for x, _ in build_reference_loader(
                indexed_dataset, "train", batch_size=48, views=1, preset="eval", train=False, num_threads=0
            )
        ]
    )
    # 48 images x 12 views = 576 views per backend, in one epoch (one DALI pipeline build). Sizing:
    # each z-test's threshold is 4.5 sqrt(2 / 576) = 0.27 of a statistic's per-view SD (a bias of
    # 0.4 SD fails with probability 0.99); 29 tests a preset give a false alarm of 2e-4. The grey
    # share at grayscale_p = 0.2 has a band of +-0.075 (binomial SD 0.017): grey never, always or at
    # 1 - p fails, and a rate off by 0.1 with probability 0.97 (finer: tests/test_dali.py, 768 draws).
    dali = view_residuals(*collect_labelled_views("dali", indexed_dataset, name, epochs=1, views=12, seed=1), originals)
    ref = view_residuals(*collect_labelled_views("torch", indexed_dataset, name, epochs=1, views=12, seed=2), originals)
    preset = get_preset(name)
    # Both backends make exact grey views, which no later op (RandAugment, jigsaw) colours again,
    # so the grey fraction counts grayscale_p for every preset.
    for key in dali:
        # the mean shift, and the spread (second moment) the augmentation gives each statistic
        assert_same_mean(dali[key], ref[key], f"{name}: per-view {key}")
        if key != "grey":
            assert_same_mean(dali[key] ** 2, ref[key] ** 2, f"{name}: per-view {key} squared")
    p = preset.grayscale_p
    for backend, stats in (("dali", dali), ("reference", ref)):
        n = len(stats["grey"])
        assert abs(stats["grey"].mean() - p) <= Z * np.sqrt(p * (1 - p) / n), (
            f"{name}: {backend} made {stats['grey'].mean():.3f} of its {n} views grey, grayscale_p is {p}"
        )
