"""Operations over every BatchNorm layer of a model: swap plain BatchNorms for the per-view layer
(ensiam_fast/batchnorm.py), sync them across processes, tell them the number of views, freeze their
running statistics for a while, and guard them against gradient-checkpoint recomputes."""

from __future__ import annotations

import contextlib
import sys

import torch.nn as nn

from ensiam_fast.batchnorm import PerViewBatchNorm, PerViewBatchNormAct, recomputing

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _per_view_type(module: nn.Module) -> type[PerViewBatchNorm] | None:
    """The per-view class that can stand in for ``module`` (exact types only: a subclass may add
    semantics the per-view layer would drop), or None."""
    if type(module) in _PLAIN_BN:
        return PerViewBatchNorm
    norm_act = sys.modules.get("timm.layers.norm_act")  # timm is loaded when one of its models is
    if norm_act is not None and type(module) is getattr(norm_act, "BatchNormAct2d", None):
        return PerViewBatchNormAct
    return None


def convert_per_view_bn(module: nn.Module) -> nn.Module:
    """Replace every plain BatchNorm (and timm's ``BatchNormAct2d``) in ``module`` by a per-view layer
    sharing its tensors.

    Other BatchNorm subclasses (SyncBatchNorm, timm's SyncBatchNormAct, ...) have semantics a per-view
    layer would drop, so they raise: use ``bn_mode="joint"`` for such backbones.
    """
    per_view = _per_view_type(module)
    if per_view is not None:
        return per_view.from_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise ValueError(
            f"cannot convert {type(module).__name__} to per-view BatchNorm; "
            "use bn_mode='joint' (or convert before SyncBatchNorm conversion)"
        )
    for name, child in module.named_children():
        try:
            module.add_module(name, convert_per_view_bn(child))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return module


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Sync every BatchNorm over ``process_group``: plain ones via torch's SyncBatchNorm, per-view
    ones in place (per-view statistics summed over the group)."""
    for layer in module.modules():
        if isinstance(layer, PerViewBatchNorm):
            layer.sync, layer.process_group = True, process_group
    return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)


@contextlib.contextmanager
def freeze_running_stats(module: nn.Module):
    """Inside, every BatchNorm of ``module`` in training mode normalises with its batch statistics as
    usual but leaves its running buffers and ``num_batches_tracked`` as they are (plain BatchNorm by
    ``track_running_stats=False`` for the while, which makes torch pass no buffers)."""
    saved = []
    for layer in module.modules():
        if isinstance(layer, PerViewBatchNorm):
            saved.append((layer, "stats_frozen", layer.stats_frozen))
            layer.stats_frozen = True
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            saved.append((layer, "track_running_stats", layer.track_running_stats))
            layer.track_running_stats = False
    try:
        yield
    finally:
        for layer, name, value in saved:
            setattr(layer, name, value)


def _freeze_when_recomputing(layer: nn.Module, args) -> None:
    # The buffers still go to the kernel (a non-reentrant checkpoint insists that the recompute saves
    # the tensors the first run saved), with an update factor of 0; the count is put back afterwards.
    if layer.training and layer.track_running_stats and recomputing():
        layer._ensiam_saved = (layer.momentum, layer.num_batches_tracked.clone())
        layer.momentum = 0.0


def _restore_after_recompute(layer: nn.Module, args, output) -> None:
    if "_ensiam_saved" in layer.__dict__:
        layer.momentum, count = layer.__dict__.pop("_ensiam_saved")
        layer.num_batches_tracked.copy_(count)


def guard_recompute(module: nn.Module) -> None:
    """Make every plain BatchNorm of ``module`` skip its running-statistics update when a gradient
    checkpoint re-runs it in the backward pass (per-view layers do so themselves)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not hasattr(layer, "_ensiam_guarded"):
            layer.register_forward_pre_hook(_freeze_when_recomputing)
            layer.register_forward_hook(_restore_after_recompute)
            layer._ensiam_guarded = True


def set_num_views(module: nn.Module, num_views: int) -> None:
    """Tell every per-view BatchNorm in ``module`` how many view groups its input holds."""
    for layer in module.modules():
        if isinstance(layer, PerViewBatchNorm):
            layer.num_views = num_views
