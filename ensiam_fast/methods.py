"""The training method as one module: the loop calls ``method(views)`` and gets ``loss`` plus scalars.

Shape legend: ``x`` is the ``(K, B, 3, H, W)`` float, normalised batch of K augmented views.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .losses import collapse_std, get_loss
from .models import SiameseNet, build_model


class SSLMethod(nn.Module):
    """A Siamese network and its loss (``method`` in ``ensiam``, ``simsiam_kaug``, ``simsiam``,
    ``fastsiam``). ``forward`` returns ``{"loss": scalar with grad, <name>: detached scalar, ...}``."""

    def __init__(self, model: SiameseNet, method: str, views: int):
        super().__init__()
        self.loss_fn = get_loss(method, views)  # validates method and views first
        self.model, self.method, self.views = model, method, views
        model.set_views(views)  # before any torch.compile traces the forward

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 5 or x.shape[0] != self.views:
            raise ValueError(f"{self.method} expects {self.views} views shaped (K, B, 3, H, W), got {tuple(x.shape)}")
        z, p = self.model(x)  # (K, B, D) each
        # The loss runs in float32 whatever the autocast dtype: cosines of 2048-d vectors in bf16
        # lose the small differences the gradient is made of.
        loss = self.loss_fn(p.float(), z.float())
        return {"loss": loss, "collapse_std": collapse_std(z)}

    def param_groups(self, base_lr: float, fix_pred_lr: bool = False) -> list[dict]:
        """Optimizer groups: encoder (backbone + projector), then predictor. ``fix_lr`` marks a group
        whose lr the schedule must leave at ``base_lr`` (SimSiam's fixed predictor lr option)."""
        encoder = [*self.model.backbone.parameters(), *self.model.projector.parameters()]
        return [
            {"name": "encoder", "params": encoder, "lr": base_lr, "fix_lr": False},
            {
                "name": "predictor",
                "params": list(self.model.predictor.parameters()),
                "lr": base_lr,
                "fix_lr": fix_pred_lr,
            },
        ]


def build_method(method: str, views: int, model: SiameseNet | None = None, **model_kwargs) -> SSLMethod:
    """The method module for a config; ``model_kwargs`` go to :func:`ensiam_fast.models.build_model`
    unless a built ``model`` is given."""
    if model is not None and model_kwargs:
        raise ValueError(f"give either a built model or model options, not both: {sorted(model_kwargs)}")
    get_loss(method, views)  # fail on a bad method/views before building a network
    return SSLMethod(model if model is not None else build_model(**model_kwargs), method, views)
