"""Where a process computes and in what precision: one rule for the trainer and the evaluation CLI.

Mixed precision. ``auto`` (the config default) lets Accelerate decide first, as Accelerate users
expect: ``accelerate launch --mixed_precision bf16``, an ``accelerate config`` file (``accelerate
launch`` passes it on) or the ``ACCELERATE_MIXED_PRECISION`` variable. Without any of those (a plain
``python -m ensiam_fast.train``): bf16 on a GPU that has it, fp16 on other GPUs, none on a CPU
(CPU autocast is slower than float32 for these convolutions). Any other config value wins over all.
"""

from __future__ import annotations

import os

import torch

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DATA_DEVICES = ("auto", "cpu", "gpu")


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
