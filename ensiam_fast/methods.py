"""The training method as one module: the loop calls ``method(views)`` and gets ``loss`` plus scalars.

Shape legend: ``x`` is the ``(K, B, 3, H, W)`` float, normalised batch of K augmented views.

Views in chunks (``views_per_pass``, :func:`train_views`). Every method's target is a stop-gradient
function of the K projections, and per-view BatchNorm normalises each view with its own statistics,
so the K views need not go through the network together: a no-grad pass computes all K projections
(hence the targets, and it makes the step's BatchNorm running-statistics updates, K per layer in view
order, as the fused step does), then the views go through n at a time, each chunk's share of the loss
against the fixed targets backpropagated with the running statistics frozen, the gradients adding
up. The sum is the fused step's gradient up to float rounding; memory is one chunk's activations
(the no-grad pass goes in chunks too); the cost is one extra forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn

from .batchnorm_ops import freeze_running_stats
from .losses import TARGETS, collapse_std, get_loss, negative_cosine
from .models import SiameseNet, build_model


class SSLMethod(nn.Module):
    """A Siamese network and its loss (``method`` in ``ensiam``, ``simsiam_kaug``, ``simsiam``,
    ``fastsiam``). ``forward`` returns ``{"loss": scalar with grad, <name>: detached scalar, ...}``."""

    def __init__(self, model: SiameseNet, method: str, views: int):
        super().__init__()
        self.loss_fn = get_loss(method, views)  # validates method and views first
        self.model, self.method, self.views = model, method, views
        model.set_views(views)  # before any torch.compile traces the forward

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, first_view: int = 0
    ) -> dict[str, torch.Tensor]:
        """The fused step over all K views; or, given ``targets`` (from :meth:`targets`), the loss share
        of the n views ``x`` (views ``first_view`` to ``first_view + n - 1``): n/K of their mean."""
        if targets is not None:
            return self._chunk_loss(x, targets, first_view)
        if x.ndim != 5 or x.shape[0] != self.views:
            raise ValueError(f"{self.method} expects {self.views} views shaped (K, B, 3, H, W), got {tuple(x.shape)}")
        z, p = self.model(x)  # (K, B, D) each
        # The loss runs in float32 whatever the autocast dtype: cosines of 2048-d vectors in bf16
        # lose the small differences the gradient is made of.
        loss = self.loss_fn(p.float(), z.float())
        return {"loss": loss, "collapse_std": collapse_std(z)}

    @torch.no_grad()
    def targets(self, x: torch.Tensor, views_per_pass: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The no-grad pass over all K views, ``views_per_pass`` at a time (default all): the
        stop-gradient targets (``(K, B, D)``, or ``(1, B, D)`` for EnSiam's shared mean) and the
        projections ``z``. In training mode it makes the step's BatchNorm running-statistics updates:
        per-view statistics do not depend on the other views, and the chunks go in view order, so
        every layer gets the K updates of the fused step in its order."""
        if x.ndim != 5 or x.shape[0] != self.views:
            raise ValueError(f"{self.method} expects {self.views} views shaped (K, B, 3, H, W), got {tuple(x.shape)}")
        n = views_per_pass or self.views
        # the predictor runs too: its BatchNorms update here, like the others
        z = torch.cat([self.model(x[i : i + n])[0] for i in range(0, self.views, n)])
        return TARGETS[self.method](z.float()), z

    def _chunk_loss(self, x: torch.Tensor, targets: torch.Tensor, first_view: int) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        if x.ndim != 5 or not 0 <= first_view < first_view + n <= self.views:
            raise ValueError(f"views {first_view}..{first_view + n - 1} of {self.views}, got {tuple(x.shape)}")
        _, p = self.model(x)
        t = targets if targets.shape[0] == 1 else targets[first_view : first_view + n]
        return {"loss": negative_cosine(p.float(), t).mean() * (n / self.views)}

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


def train_views(
    step: Callable[..., dict[str, torch.Tensor]],
    method: SSLMethod,
    x: torch.Tensor,
    views_per_pass: int,
    backward: Callable[[torch.Tensor], None],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """Forward and backward of one batch ``x`` (K views), fused or ``views_per_pass`` views at a time.

    ``step`` is the (possibly wrapped or compiled) ``method``; ``backward(loss)`` backpropagates
    (e.g. ``accelerator.backward``, which scales and divides for accumulation); ``no_sync()`` keeps a
    data-parallel wrapper from synchronising gradients, so that happens once, on the last chunk.
    Returns the step's detached ``loss`` and ``collapse_std``.
    """
    k = x.shape[0]
    if views_per_pass >= k:
        with autocast():
            outputs = step(x)
        backward(outputs["loss"])
        return outputs
    if k % views_per_pass:
        raise ValueError(f"views_per_pass={views_per_pass} does not divide the {k} views")
    with autocast():
        targets, z = method.targets(x, views_per_pass)
    losses = []
    with freeze_running_stats(method):  # the no-grad pass made this step's updates
        for first in range(0, k, views_per_pass):
            last = first + views_per_pass == k
            with contextlib.nullcontext() if last else no_sync():
                with autocast():
                    loss = step(x[first : first + views_per_pass], targets=targets, first_view=first)["loss"]
                backward(loss)
            losses.append(loss.detach())
    return {"loss": torch.stack(losses).sum(), "collapse_std": collapse_std(z)}
