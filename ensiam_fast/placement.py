"""Where a process computes and in what precision: one rule for the trainer, the loaders, the
evaluation CLI and the analysis tools.

Devices. ``resolve_device`` reads every device string the project accepts (``auto``, ``cpu``,
``gpu``, ``cuda``, ``cuda:N``, ``gpu:N``) into DALI's kind, the GPU index and the torch device;
``resolve_data_device`` picks where DALI augments for a process whose device Accelerate chose.

Mixed precision. ``auto`` (the config default) lets Accelerate decide first, as Accelerate users
expect: ``accelerate launch --mixed_precision bf16``, an ``accelerate config`` file (``accelerate
launch`` passes it on) or the ``ACCELERATE_MIXED_PRECISION`` variable. Without any of those (a plain
``python -m ensiam_fast.train``): bf16 on a GPU that has it, fp16 on other GPUs, none on a CPU
(CPU autocast is slower than float32 for these convolutions). Any other config value wins over all.
"""

from __future__ import annotations

import os

import torch

from ensiam_fast.choices import DATA_DEVICES, MIXED_PRECISION  # noqa: F401  (the settings this module reads)
from ensiam_fast.errors import UserError


def resolve_mixed_precision(setting: str) -> str:
    """The precision for ``Accelerator(mixed_precision=...)`` from the config's ``mixed_precision``."""
    if setting != "auto":
        return setting
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched.lower()
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_data_device(setting: str, accelerator) -> str:
    """Where DALI decodes and augments: ``gpu`` or ``cpu`` (``auto``: the GPU when the process has one)."""
    on_cuda = accelerator.device.type == "cuda"
    if setting == "auto":
        return "gpu" if on_cuda else "cpu"
    if setting == "gpu" and not on_cuda:
        raise ValueError("data.device=gpu needs a CUDA device; use data.device=cpu or auto")
    return setting


class DeviceError(UserError, ValueError):
    """A device string that names no device, or a GPU on a host without one."""


def resolve_device(device: str | torch.device, what: str = "device") -> tuple[str, int | None, torch.device]:
    """``'auto' | 'cpu' | 'gpu' | 'cuda' | 'cuda:N' | 'gpu:N'`` -> (DALI kind ``cpu``/``gpu``, GPU index
    or None, torch device). ``auto``: the current CUDA device when torch sees one, else the CPU.
    ``what`` names the setting in the error (``device``, ``--device``)."""
    text = str(device)
    kind, _, index = text.partition(":")
    if kind == "auto" and not index:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu" and not index:
        return "cpu", None, torch.device("cpu")
    if kind in ("gpu", "cuda") and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise DeviceError(f"{what}={text!r} asks for a GPU but torch sees no CUDA device; use {what}=cpu")
        device_id = int(index) if index else torch.cuda.current_device()
        return "gpu", device_id, torch.device("cuda", device_id)
    raise DeviceError(f"{what} must be 'auto', 'cpu', 'gpu', 'cuda' or 'cuda:N', got {text!r}")
