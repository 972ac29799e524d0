"""ensiam_fast/stems.py: the CIFAR stem of each backbone family, pretrained-tag names, early backbone checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ensiam_fast import train
from ensiam_fast.methods import build_method
from ensiam_fast.stems import check_backbone, create_backbone

SMALL = dict(proj_hidden=32, proj_dim=32, pred_hidden=8)


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet26d", "regnety_002", "efficientnet_b0", "convnext_atto", "mobilenetv3_small_100"]
)
def test_cifar_stem_keeps_the_resolution_the_standard_stem_drops(name):
    """At 32x32 the CIFAR stem leaves 4x (ResNet, ConvNeXt: stride 2 conv + max-pool or stride-4 patchify)
    or 2x (one stride-2 conv) the standard stem's feature-map side."""
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cifar = create_backbone(name, cifar_stem=True).eval().forward_features(x)
        standard = create_backbone(name, cifar_stem=False).eval().forward_features(x)
    ratio = cifar.shape[-1] / standard.shape[-1]
    assert ratio == (4 if name.startswith(("resnet", "convnext")) else 2), (name, cifar.shape, standard.shape)
    assert cifar.shape[:2] == standard.shape[:2]


def test_deep_stem_keeps_its_three_convs_at_stride_one():
    model = create_backbone("resnet26d", cifar_stem=True)
    convs = [m for m in model.conv1 if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(c.stride == (1, 1) and c.kernel_size == (3, 3) for c in convs)
    assert isinstance(model.maxpool, nn.Identity)


# RegNet and EfficientNet normalise with timm's BatchNormAct2d: per-view through PerViewBatchNormAct
@pytest.mark.parametrize("name", ["resnet26d", "convnext_atto", "regnety_002", "efficientnet_b0"])
def test_family_trains_one_step_with_the_cifar_stem_and_per_view_bn(name):
    torch.manual_seed(0)
    method = build_method("ensiam", 2, backbone=name, cifar_stem=True, bn_mode="per_view", proj_layers=2, **SMALL)
    per_view = [m for m in method.model.backbone.modules() if type(m).__name__.startswith("PerView")]
    assert bool(per_view) == (name != "convnext_atto")  # ConvNeXt normalises with LayerNorm only
    before = {k: v.detach().clone() for k, v in method.named_parameters()}
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    out = method(torch.randn(2, 4, 3, 16, 16))  # (K, B, 3, H, W)
    out["loss"].backward()
    opt.step()
    assert torch.isfinite(out["loss"])
    stem = next(n for n, _ in method.model.backbone.named_parameters())  # the first (stem) weight
    assert not torch.equal(before[f"model.backbone.{stem}"], dict(method.named_parameters())[f"model.backbone.{stem}"])


def test_pretrained_tag_names_are_accepted_without_weights():
    model = create_backbone("resnet18.a1_in1k", cifar_stem=True)  # pretrained=False: nothing downloaded
    assert model.num_features == 512
    with pytest.raises(ValueError, match="no pretrained tag 'nope'.*a1_in1k"):
        check_backbone("resnet18.nope", cifar_stem=False)
    with pytest.raises(ValueError, match="Close matches: resnet18"):
        check_backbone("resnt18", cifar_stem=False)


@pytest.mark.parametrize(
    "backbone,needle", [("vit_tiny_patch16_224", "VisionTransformer"), ("resnt18", "unknown backbone")]
)
def test_bad_backbone_is_reported_before_the_data(tmp_path, capsys, backbone, needle):
    """The data root does not exist: the error is about the backbone, so it came first."""
    argv = [
        "--config",
        "demo",
        f"data.root={tmp_path / 'no-data'}",
        f"output_dir={tmp_path / 'run'}",
        f"model.backbone={backbone}",
        "model.cifar_stem=true",
    ]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.backbone=") and needle in err and "no-data" not in err
    assert not (tmp_path / "run").exists()
