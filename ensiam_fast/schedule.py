"""The learning-rate schedule, one home for pretraining (train.py) and the linear probe (evaluate/linear.py)."""

from __future__ import annotations

import math


def cosine_lr(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0) -> float:
    """The rate at optimizer step ``step`` (0-based): a linear warm-up over ``warmup_steps`` steps to
    ``peak_lr``, then a cosine decay to 0 at ``total_steps`` (held at 0 after it)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
