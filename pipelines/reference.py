"""The augmentation presets in torchvision (transforms.v2 on uint8 tensors).

The reference side of the DALI pipelines: ``ViewAugment`` applies every field of an ``AugPreset``
to one uint8 image. The torch loader (``ensiam_fast.data.torch``) uses it; so do the parity tests.

Gaussian blur: torchvision needs a kernel size; like DALI (which derives its window from sigma)
we use ``2 * ceil(3 * sigma) + 1`` (the kernel covers +-3 sigma), capped at the largest odd size
that fits the image, so a small sigma costs a small kernel and 32x32 views are not blurred by
a 23-tap kernel sized for 224x224.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF

from pipelines.presets import JIGSAW_LOCAL_K, AugPreset

# ---------------------------------------------------------------------------------------------
# Augmentation: one view of one image, torch's global RNG (seeded per batch by the caller).
# ---------------------------------------------------------------------------------------------


def jigsaw_order(grid: int, mode: str = "global", generator: torch.Generator | None = None) -> torch.Tensor:
    """For each output tile (row-major), the index of the source tile it shows.

    'global': a uniform permutation of all grid*grid tiles. 'local' (DCL's region confusion): each
    row of tiles reordered by sorting ``x + U(-k, k)``, then each column by ``y + U(-k, k)``.
    """
    n = grid * grid
    if mode == "global":
        return torch.randperm(n, generator=generator)
    if mode != "local":
        raise ValueError(f"jigsaw mode must be 'global' or 'local', got {mode!r}")
    k = JIGSAW_LOCAL_K
    src = torch.arange(n).reshape(grid, grid)
    steps = torch.arange(grid, dtype=torch.float64)
    for y in range(grid):
        noise = torch.rand(grid, generator=generator, dtype=torch.float64) * 2 * k - k
        src[y] = src[y, torch.argsort(steps + noise)]
    for x in range(grid):
        noise = torch.rand(grid, generator=generator, dtype=torch.float64) * 2 * k - k
        src[:, x] = src[torch.argsort(steps + noise), x]
    return src.flatten()


def jigsaw(
    img: torch.Tensor, grid: int, generator: torch.Generator | None = None, mode: str = "global"
) -> torch.Tensor:
    """Cut ``img`` (..., C, H, W) into grid x grid tiles and put them back in a random order
    (``jigsaw_order``).

    Tiles are ``H // grid`` x ``W // grid``; when the side is not a multiple of ``grid`` the
    remaining bottom rows / right columns stay where they are.
    """
    if grid < 1:
        raise ValueError(f"jigsaw grid must be >= 1, got {grid}")
    h, w = img.shape[-2:]
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        raise ValueError(f"jigsaw grid {grid} is larger than the image ({h}x{w})")
    lead = img.shape[:-2]
    core = img[..., : th * grid, : tw * grid]
    # (..., grid_y, th, grid_x, tw) -> (..., grid_y*grid_x, th, tw): one entry per tile
    tiles = core.reshape(*lead, grid, th, grid, tw).movedim(-3, -2).reshape(*lead, grid * grid, th, tw)
    perm = jigsaw_order(grid, mode, generator)
    shuffled = tiles[..., perm, :, :].reshape(*lead, grid, grid, th, tw).movedim(-2, -3)
    out = img.clone()
    out[..., : th * grid, : tw * grid] = shuffled.reshape(*lead, th * grid, tw * grid)
    return out


def blur_kernel_size(sigma: float, side: int) -> int:
    """Odd kernel covering +-3 sigma, no larger than the image side allows."""
    k = 2 * math.ceil(3 * sigma) + 1
    largest = side if side % 2 == 1 else side - 1
    return max(1, min(k, largest))


def gaussian_blur(img: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """torchvision's Gaussian blur (reflect padding, same kernel), done as two 1-D passes.

    ``torchvision.transforms.v2.functional.gaussian_blur`` convolves with the full k x k kernel;
    the Gaussian is separable, so two k-tap passes give the same picture (to rounding) for less
    work. Keeps the baseline honest rather than slow.
    """
    half = (kernel - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel)
    k1 = torch.softmax(-(x / sigma).pow(2) / 2, dim=0)  # exp(-x^2 / 2 sigma^2), normalised
    c = img.shape[-3]
    out = img.to(torch.float32).unsqueeze(0)
    pad = kernel // 2
    out = torch.nn.functional.pad(out, [pad, pad, pad, pad], mode="reflect")
    out = torch.nn.functional.conv2d(out, k1.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    out = torch.nn.functional.conv2d(out, k1.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)
    return out.squeeze(0).round_().clamp_(0, 255).to(img.dtype)


class ViewAugment:
    """One augmented view of a uint8 (3, H, W) image, following every field of an ``AugPreset``,
    its stages in the preset's order (``AugPreset.stages``)."""

    def __init__(self, preset: AugPreset, size: int):
        self.preset = preset
        self.size = size
        if preset.crop:
            self.geometry = v2.RandomResizedCrop(size, scale=preset.crop_scale, ratio=preset.crop_ratio, antialias=True)
        else:
            short = max(size, round(preset.resize_ratio * size))
            self.geometry = v2.Compose([v2.Resize(short, antialias=True), v2.CenterCrop(size)])
        has_jitter = any((preset.brightness, preset.contrast, preset.saturation, preset.hue))
        self.jitter = (
            v2.ColorJitter(preset.brightness, preset.contrast, preset.saturation, preset.hue)
            if preset.jitter_p > 0 and has_jitter
            else None
        )
        self.randaugment = (
            v2.RandAugment(
                num_ops=preset.randaugment_n,
                magnitude=preset.randaugment_m,
                num_magnitude_bins=preset.randaugment_bins,
            )
            if preset.randaugment_n > 0
            else None
        )

    @staticmethod
    def _coin(p: float) -> bool:
        # Same convention as torchvision's RandomApply: apply when U(0,1) < p.
        return p > 0 and float(torch.rand(())) < p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        for stage in self.preset.stages:
            img = getattr(self, f"_{stage}")(img)
        return img

    def _crop(self, img: torch.Tensor) -> torch.Tensor:
        return self.geometry(img)

    def _flip(self, img: torch.Tensor) -> torch.Tensor:
        return TF.horizontal_flip(img) if self._coin(self.preset.flip_p) else img

    def _colour(self, img: torch.Tensor) -> torch.Tensor:
        if self.jitter is not None and self._coin(self.preset.jitter_p):
            img = self.jitter(img)
        if self._coin(self.preset.grayscale_p):
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        return img

    def _blur(self, img: torch.Tensor) -> torch.Tensor:
        if not self._coin(self.preset.blur_p):
            return img
        lo, hi = self.preset.blur_sigma
        sigma = lo + (hi - lo) * float(torch.rand(()))
        return gaussian_blur(img, blur_kernel_size(sigma, min(img.shape[-2:])), sigma)

    def _randaugment(self, img: torch.Tensor) -> torch.Tensor:
        return self.randaugment(img)

    def _jigsaw(self, img: torch.Tensor) -> torch.Tensor:
        if not self._coin(self.preset.jigsaw_p):
            return img
        return jigsaw(img, self.preset.jigsaw_grid, mode=self.preset.jigsaw_mode)
