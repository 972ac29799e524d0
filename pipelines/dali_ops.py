"""The stages of a view that stay DALI operators: the crop (DALI's resampling: the GPU graph's
crops, and the deterministic resize + centre crop of evaluation), the flip and the HWC -> CHW
transpose. Every later stage is a fused kernel (``pipelines.kernels``, ``pipelines.fused``).

Each stage is a pure function of a batch of uint8 HWC views (DataNodes) and the preset; every
operator runs where its input lives.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types

from pipelines.kernel_ops import draw_window
from pipelines.presets import AugPreset


def crop(images, preset: AugPreset, size: int):
    """Random resized crop to size x size, or (no randomness) shorter side to resize_ratio*size
    and a centre crop.

    Antialiased linear resampling, as torchvision's RandomResizedCrop on uint8 tensors: without
    it the crop is cheaper but aliases large crops.
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


def crop_flip(images, preset: AugPreset, size: int):
    """The random resized crop and then, with probability flip_p, the horizontal flip, as one
    resampling (the flip costs no pass of its own).

    The window is drawn as ``fn.random_resized_crop`` draws it (``fn.random_crop_generator``: the
    same area and aspect ranges, ten attempts, then the centre fallback) and resized with the same
    antialiased linear filter; a mirrored view reads its window right to left (an ROI whose x start
    lies past its end, which DALI's resize documents as a flip). Equal to ``crop`` then ``flip`` up
    to rounding: one grey level on well under 0.1% of the values (``tests/test_dali.py``).
    """
    anchor, extent = draw_window(images, preset)
    coin = fn.random.coin_flip(probability=preset.flip_p, dtype=types.INT32, shape=[1])
    mirror = coin * types.Constant(np.float32([0.0, 1.0]))  # (y, x): only x is ever reversed
    return fn.resize(
        images,
        size=[size, size],
        roi_start=anchor + extent * mirror,
        roi_end=anchor + extent * (1.0 - mirror),
        roi_relative=False,
        antialias=True,
    )


def flip(images, flip_p: float):
    """Horizontal flip with probability flip_p, drawn per sample."""
    return fn.flip(images, horizontal=fn.random.coin_flip(probability=flip_p, dtype=types.INT32))


def to_chw(images):
    """HWC -> CHW, the layout the views leave the pipeline in (uint8)."""
    return fn.transpose(images, perm=[2, 0, 1], output_layout="CHW")
