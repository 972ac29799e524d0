"""Loader arguments resolved against a dataset: device, augmentation preset, image size, seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.presets import AugPreset, get_preset


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from a tuple of non-negative ints (statistically independent streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def resolve_device(device: str | torch.device) -> tuple[str, int | None, torch.device]:
    """'cpu' | 'gpu' | 'cuda' | 'cuda:N' | 'gpu:N' -> (DALI kind, device_id, torch device)."""
    text = str(device)
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return "cpu", None, torch.device("cpu")
    if kind in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={text!r} asks for a GPU but torch sees no CUDA device; use device='cpu'")
        device_id = int(index) if index else torch.cuda.current_device()
        return "gpu", device_id, torch.device("cuda", device_id)
    raise ValueError(f"device must be 'cpu', 'gpu', 'cuda' or 'cuda:N', got {text!r}")


def resolve_preset(preset: str | AugPreset, train: bool) -> AugPreset:
    """The preset to apply: evaluation forces 'eval' unless 'linear' is asked for."""
    resolved = get_preset(preset)
    if not train and resolved.name not in ("linear", "eval"):
        return get_preset("eval")
    return resolved


def resolve_image_size(image_size: int | None, manifest_size: list[int] | None, root: Path) -> int:
    if image_size is not None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        return image_size
    if not manifest_size:
        raise ValueError(f"{root}/manifest.json has no image_size (its images differ in size): pass image_size=...")
    return int(manifest_size[0])


def check_not_empty(root: Path, split: str, num_samples: int) -> None:
    """An empty split cannot feed a loader: say so, not some batch-size arithmetic later."""
    if num_samples < 1:
        from ensiam_fast.shards.format import ShardFormatError

        raise ShardFormatError(
            f"split {split!r} of {root} holds no samples (manifest.json); choose another split or re-make "
            "the dataset with tools/make_shards.py"
        )
