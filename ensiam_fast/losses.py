"""Siamese losses as pure functions of tensors (no distributed calls, no logging).

Shape legend: ``p`` are the predictor outputs g_k and ``z`` the projector outputs f_k of the K views,
both ``(K, B, D)``. Every loss stops the gradient through its target (the paper's phi) and returns
the mean over views and samples, so it is a scalar tensor. Equation numbers refer to the EnSiam paper
(Han and Lee, "EnSiam: Self-Supervised Learning With Ensemble Representations").
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ensiam_fast.config_checks import check_method_views
from pipelines.presets import check_views

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -cos(p, z) along the last dimension, per sample (shapes broadcast).

    The gradient is NOT stopped here: the losses below pass an already detached target.

    >>> negative_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]))  # -1/sqrt(2)
    tensor([-0.7071])
    """
    return -F.cosine_similarity(p, z, dim=-1)


def _check_views(p: torch.Tensor, z: torch.Tensor) -> int:
    """Validate ``(K, B, D)`` inputs and return K."""
    if p.ndim != 3:
        raise ValueError(f"p must be shaped (K, B, D), got ndim={p.ndim} with shape {tuple(p.shape)}")
    if z.shape != p.shape:
        raise ValueError(f"p and z must have the same (K, B, D) shape, got p {tuple(p.shape)} and z {tuple(z.shape)}")
    k = int(p.shape[0])
    try:
        check_views(k, minimum=2)
    except ValueError as e:
        raise ValueError(f"a Siamese loss needs K >= 2 views, got K={k}: {e}") from None
    return k


# The targets phi(b) of equation (8): each loss below compares view k's prediction with row k of its
# target (a single row broadcasts to every view). They are functions of their own so that the
# gradient-variance analysis (ensiam_fast/analysis/gradvar.py) measures Var[b] of exactly these.


def ensiam_target(z: torch.Tensor) -> torch.Tensor:
    """EnSiam's target phi(f_bar), the mean of the K projections: (K, B, D) -> (1, B, D), detached."""
    return z.detach().mean(dim=0, keepdim=True)


def simsiam_kaug_target(z: torch.Tensor) -> torch.Tensor:
    """SimSiam K-aug's targets phi(f_N(k)), each view's partner: (K, B, D) -> (K, B, D), detached."""
    k = z.shape[0]
    if k % 2:
        raise ValueError(f"simsiam_kaug pairs views 1<->2, 3<->4, ...: K must be even, got K={k}")
    partner = torch.arange(k, device=z.device) ^ 1  # N(k) zero-based: 0<->1, 2<->3, ...
    return z.detach()[partner]


def fastsiam_target(z: torch.Tensor) -> torch.Tensor:
    """FastSiam's targets, the mean of the other K-1 projections: (K, B, D) -> (K, B, D), detached."""
    z = z.detach()
    return (z.sum(dim=0, keepdim=True) - z) / (z.shape[0] - 1)


def ensiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """EnSiam, equation (5): (1/K) sum_k D(g_k, phi(f_bar)) with f_bar = (1/K) sum_k f_k.

    Every view's prediction is pulled towards the stop-gradient mean of the K raw (not normalised)
    projections. Example with K=2, B=1, D=2: p = [[1, 0]], [[0, 1]]; z = [[1, 0]], [[0, 1]]
    gives f_bar = [0.5, 0.5], cos = 1/sqrt(2) for both views, loss = -0.7071.
    """
    _check_views(p, z)
    return negative_cosine(p, ensiam_target(z)).mean()


def simsiam_kaug_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam K-aug, equation (2): (1/K) sum_k D(g_k, phi(f_N(k))), K even.

    N pairs views 1<->2, 3<->4, ... (zero-based 0<->1, 2<->3). With K=2 this is exactly the official
    SimSiam loss -(cos(p1, z2) + cos(p2, z1)) / 2. Example with K=2, B=1, D=2: p = [[1, 0]], [[1, 0]];
    z = [[1, 0]], [[0, 1]] gives -(cos(p1, z2) + cos(p2, z1)) / 2 = -(0 + 1) / 2 = -0.5.
    """
    _check_views(p, z)
    return negative_cosine(p, simsiam_kaug_target(z)).mean()


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The original two-view SimSiam loss, equation (1); equation (2) with K=2."""
    k = _check_views(p, z)
    if k != 2:
        raise ValueError(f"simsiam is the two-view loss, got K={k} views (use simsiam_kaug or ensiam)")
    return simsiam_kaug_loss(p, z)


def fastsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """FastSiam (Pototzky et al. 2022), leave-one-out: view k's target is phi(mean of the other K-1 f_j).

    With K=2 the target of each view is the other view's projection, i.e. SimSiam. Example with K=3,
    B=1, D=2: z = [1, 0], [0, 1], [0, 1]; the target of view 1 is [0, 1], of views 2 and 3 [0.5, 0.5].
    """
    _check_views(p, z)
    return negative_cosine(p, fastsiam_target(z)).mean()


def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse indicator: mean over channels of the per-channel std of l2-normalised z.

    ``z`` is ``(..., D)``; all leading dimensions count as samples. About 1/sqrt(D) when the outputs
    spread over the unit sphere, about 0 when they collapse to one point. Detached, float32.
    """
    if z.ndim < 2:
        raise ValueError(f"collapse_std needs samples x channels, got shape {tuple(z.shape)}")
    flat = F.normalize(z.detach().float().reshape(-1, z.shape[-1]), dim=-1)
    return flat.std(dim=0).mean()


TARGETS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ensiam": ensiam_target,
    "simsiam_kaug": simsiam_kaug_target,
    "simsiam": simsiam_kaug_target,
    "fastsiam": fastsiam_target,
}

LOSSES: dict[str, LossFn] = {
    "ensiam": ensiam_loss,
    "simsiam_kaug": simsiam_kaug_loss,
    "simsiam": simsiam_loss,
    "fastsiam": fastsiam_loss,
}


def get_loss(method: str, views: int) -> LossFn:
    """The loss for a config's ``method`` name, after checking that ``views`` (K) suits it."""
    if method not in LOSSES:
        close = difflib.get_close_matches(method, list(LOSSES), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(LOSSES)}.{hint}")
    check_method_views(method, views)  # the config's rule (a ConfigError, so a ValueError)
    return LOSSES[method]
