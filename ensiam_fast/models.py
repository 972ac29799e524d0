"""The Siamese network: a timm backbone, the SimSiam projector and predictor, one fused K-view forward.

Shape legend: K views, B images per view, D projection size. ``SiameseNet.forward`` takes the
``(K, B, 3, H, W)`` batch, runs the backbone ONCE over the ``K*B`` images and returns ``z`` and ``p``
shaped ``(K, B, D)``.

BatchNorm. ``bn_mode="per_view"`` (the default) makes every BatchNorm normalise with the statistics
of one view, as official SimSiam's separate forwards do (:mod:`ensiam_fast.batchnorm`);
``bn_mode="joint"`` keeps timm's plain BatchNorm, whose statistics pool all K*B images.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ensiam_fast.batchnorm_ops import convert_per_view_bn, guard_recompute, set_num_views
from ensiam_fast.choices import BN_MODES
from ensiam_fast.stems import create_backbone


def projection_mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """SimSiam projector: Linear-BN-ReLU (layers-1 times), then Linear-BN without affine."""
    if layers < 1:
        raise ValueError(f"proj_layers must be >= 1, got {layers}")
    mods: list[nn.Module] = []
    dims = [in_dim] + [hidden] * (layers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        # No bias: the BatchNorm right after cancels it.
        mods += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    mods += [nn.Linear(dims[-1], out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False)]
    return nn.Sequential(*mods)


def prediction_mlp(dim: int, hidden: int) -> nn.Sequential:
    """SimSiam predictor: bottleneck Linear-BN-ReLU, then a plain Linear with bias."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
    )


class SiameseNet(nn.Module):
    """Backbone f, projector h and predictor g; ``forward`` returns ``(z, p)`` shaped ``(K, B, D)``."""

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        predictor: nn.Module,
        *,
        backbone_name: str,
        cifar_stem: bool,
        bn_mode: str,
    ):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.feature_dim = backbone.num_features
        self.backbone_name, self.cifar_stem, self.bn_mode = backbone_name, cifar_stem, bn_mode
        self._num_views = 1

    def set_views(self, k: int) -> None:
        """Set K for the per-view BatchNorms. ``forward`` does it when K changes; setting it once
        before ``torch.compile`` spares the recompile that the first change would cause."""
        if k != self._num_views:  # walk the modules only when K changes
            set_num_views(self, k)
            self._num_views = k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"expected views shaped (K, B, 3, H, W), got {tuple(x.shape)}")
        k, b = x.shape[:2]
        self.set_views(k)
        feats = self.backbone(x.flatten(0, 1))  # (K*B, F): one backbone pass over all views
        z = self.projector(feats)  # (K*B, D)
        p = self.predictor(z)
        return z.view(k, b, -1), p.view(k, b, -1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(N, feature_dim)`` of ``(N, 3, H, W)`` images, for evaluation."""
        if x.ndim != 4:
            raise ValueError(f"expected images shaped (N, 3, H, W), got {tuple(x.shape)}")
        k = self._num_views
        self.set_views(1)
        try:
            return self.backbone(x)
        finally:
            self.set_views(k)  # back to the training K, so a compiled forward keeps its guards


def enable_grad_checkpointing(model: SiameseNet) -> None:
    """timm's gradient checkpointing on the backbone (its stages' activations recomputed in the
    backward pass), with every BatchNorm updating its running statistics in the first run only."""
    if not hasattr(model.backbone, "set_grad_checkpointing"):
        raise ValueError(f"backbone {model.backbone_name!r} has no set_grad_checkpointing (timm)")
    model.backbone.set_grad_checkpointing(True)
    guard_recompute(model)


def build_model(
    backbone: str = "resnet18",
    cifar_stem: bool = True,
    proj_layers: int = 2,
    bn_mode: str = "per_view",
    proj_hidden: int = 2048,
    proj_dim: int = 2048,
    pred_hidden: int = 512,
    pretrained: bool = False,
) -> SiameseNet:
    """Build the Siamese network (paper: hidden/out 2048, 2 projector layers small data, 3 ImageNet)."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    net = create_backbone(backbone, cifar_stem, pretrained)
    model = SiameseNet(
        net,
        projection_mlp(net.num_features, proj_hidden, proj_dim, proj_layers),
        prediction_mlp(proj_dim, pred_hidden),
        backbone_name=backbone,
        cifar_stem=cifar_stem,
        bn_mode=bn_mode,
    )
    if bn_mode == "per_view":
        convert_per_view_bn(model)
    return model
