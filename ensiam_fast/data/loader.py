"""The loader factory ``build_loader`` (DALI or torch backend) and ``normalize`` for its output.

The contract is in the package docstring (``ensiam_fast.data``).
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch

from ensiam_fast.choices import BACKENDS
from ensiam_fast.data.spec import loader_spec
from pipelines.presets import MEAN, STD


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 views (K, B, 3, H, W) -> (x / 255 - MEAN) / STD as ``dtype``, on x's device.

    With ``channels_last`` the result's memory is (K, B, H, W, 3), so ``y.flatten(0, 1)`` is an
    NHWC (channels_last) batch without a copy.
    """
    if x.dim() != 5 or x.shape[2] != 3:
        raise ValueError(f"normalize expects uint8 views shaped (K, B, 3, H, W), got {tuple(x.shape)}")
    mean = torch.tensor(MEAN, dtype=torch.float32)
    std = torch.tensor(STD, dtype=torch.float32)
    scale = (1.0 / (255.0 * std)).to(device=x.device, dtype=dtype)
    shift = (-mean / std).to(device=x.device, dtype=dtype)
    k, b, _, h, w = x.shape
    if channels_last:
        out = torch.empty((k, b, h, w, 3), dtype=dtype, device=x.device)  # NHWC memory per view
        torch.addcmul(shift, x.permute(0, 1, 3, 4, 2), scale, out=out)
        return out.permute(0, 1, 4, 2, 3)
    out = torch.empty((k, b, 3, h, w), dtype=dtype, device=x.device)
    return torch.addcmul(shift.view(3, 1, 1), x, scale.view(3, 1, 1), out=out)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_loader(
    root: str | os.PathLike,
    split: str,
    *,
    device: str | torch.device = "cpu",
    backend: str = "dali",
    num_samples: int | None = None,
    cpu_kernels: str = "auto",
    **spec_args,
):
    """A loader of (K, B, 3, H, W) uint8 views and (B,) int64 labels; see the module docstring.
    ``spec_args`` are ``ensiam_fast.data.spec.loader_spec``'s keywords, checked there: ``batch_size``,
    ``views`` and ``preset``, and optionally ``shard_id``, ``num_shards``, ``seed``, ``train``,
    ``image_size``, ``num_threads`` and ``shuffle`` (default: ``train``; False reads a training split in
    stored order, with training augmentations: ``ensiam_fast.data.spec.check_shuffle``).
    ``cpu_kernels`` (DALI on the CPU only): 'auto' | 'numba' | 'dali' (``pipelines.kernels.backend``).

    ``backend="synthetic"`` ignores ``root``/``split`` and the augmentation (``preset``, ``train``,
    ``num_threads``, ``shuffle``) and yields ``num_samples`` random images per epoch
    (``ensiam_fast.data.synthetic``); the other backends read the size from the manifest.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'dali' or 'torch' (or 'synthetic': random views), got {backend!r}")
    if backend == "synthetic":
        from ensiam_fast.data.synthetic import DEFAULT_SAMPLES, SHAPE_ARGS, SyntheticLoader

        inspect.signature(loader_spec).bind(root, split, **spec_args)  # the other backends' keywords, no others
        shape = {k: v for k, v in spec_args.items() if k in SHAPE_ARGS}
        return SyntheticLoader(device=device, num_samples=num_samples or DEFAULT_SAMPLES, **shape)
    if backend == "dali" and not dali_available():
        warnings.warn("NVIDIA DALI is not importable: falling back to the torchvision loader", stacklevel=2)
        backend = "torch"
    spec = loader_spec(root, split, **spec_args)
    if backend == "torch":
        from ensiam_fast.data.torch import reference_loader

        return reference_loader(spec, device=device)
    from ensiam_fast.data.dali import DaliLoader

    return DaliLoader(spec, device=device, cpu_kernels=cpu_kernels)
