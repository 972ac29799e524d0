"""Backbones by timm name, and the CIFAR stem for each family that has one.

The paper's small-dataset ResNet-18 (Section 4.1) replaces the 7x7 stride-2 first convolution by a
3x3 stride-1 one and drops the max-pool, so 32x32 images keep their resolution through the stem.
Each family gets the same change as far as its stem allows, one small function per family:

- ResNet (timm's and torchvision's): a plain stem's 7x7 conv becomes 3x3 stride 1; a deep stem
  (``resnet18d``, ``resnet26d``, ``resnet50d``, ...: three 3x3 convs) keeps its convs and loses the
  first one's stride; the max-pool goes.
- RegNet, EfficientNet, MobileNetV3: the 3x3 stride-2 stem conv runs at stride 1 (no max-pool there).
- ConvNeXt: the 4x4 stride-4 patchify conv becomes a 3x3 stride-1 conv (bias kept).

Other families raise a ``ValueError`` naming the family: set ``model.cifar_stem=false`` for them.
Names may carry a timm pretrained tag (``resnet18.a1_in1k``); weights load only with ``pretrained``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ensiam_fast.config_checks import backbone_error, check_backbone_name  # the name rule: timm's registry
from ensiam_fast.errors import ConfigError


def _unstride(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"expected the stem's Conv2d, found {type(conv).__name__}")
    conv.stride = (1, 1)  # padding stays: a 3x3 conv with padding 1 keeps the size at stride 1


def _resnet_stem(model: nn.Module) -> None:
    if isinstance(model.conv1, nn.Conv2d):  # plain stem: 7x7 stride 2 -> the paper's 3x3 stride 1
        conv = model.conv1
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    else:  # deep stem: conv-bn-act-conv-bn-act-conv, only the first conv strided
        _unstride(model.conv1[0])
    model.maxpool = nn.Identity()


def _regnet_stem(model: nn.Module) -> None:
    _unstride(model.stem.conv)


def _conv_stem(model: nn.Module) -> None:  # EfficientNet, MobileNetV3
    _unstride(model.conv_stem)


def _convnext_stem(model: nn.Module) -> None:
    patchify = model.stem[0]
    if not isinstance(patchify, nn.Conv2d):
        raise ValueError(f"expected ConvNeXt's patchify Conv2d, found {type(patchify).__name__}")
    model.stem[0] = nn.Conv2d(
        patchify.in_channels, patchify.out_channels, 3, stride=1, padding=1, bias=patchify.bias is not None
    )


# family (the backbone's class name, as timm and torchvision name it) -> how its stem changes
CIFAR_STEMS = {
    "ResNet": _resnet_stem,
    "RegNet": _regnet_stem,
    "EfficientNet": _conv_stem,
    "MobileNetV3": _conv_stem,
    "ConvNeXt": _convnext_stem,
}


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Give ``model`` the CIFAR stem of its family (in place; the new convs are freshly initialised)."""
    family = type(model).__name__
    change = CIFAR_STEMS.get(family)
    if change is None:
        raise ValueError(
            f"model.cifar_stem=true is defined for the families {', '.join(CIFAR_STEMS)}, not for "
            f"{family}: set model.cifar_stem=false"
        )
    try:
        change(model)
    except (AttributeError, IndexError, TypeError, ValueError) as e:
        raise ValueError(
            f"this {family} variant has a stem the CIFAR stem does not know ({e}); set model.cifar_stem=false"
        ) from None
    return model


def create_backbone(name: str, cifar_stem: bool, pretrained: bool = False) -> nn.Module:
    """A timm model by name with its classifier removed (pooled features out), stem applied."""
    import timm

    check_backbone_name(name)
    model = timm.create_model(name, num_classes=0, pretrained=pretrained)
    return apply_cifar_stem(model) if cifar_stem else model


def check_backbone(name: str, cifar_stem: bool) -> None:
    """Name and stem checked without allocating weights (built on the meta device): a bad backbone
    is reported before any data is read."""
    with torch.device("meta"):
        create_backbone(name, cifar_stem, pretrained=False)


def check_stem(cfg) -> None:
    """A config's backbone with its stem (``check_backbone``): ``ConfigError``, one line, when the
    family has no CIFAR stem. Called where a model is built from a user's config (the trainer's start,
    grad_variance), before any data is read."""
    try:
        check_backbone(cfg.model.backbone, cfg.model.cifar_stem)
    except ValueError as e:
        raise ConfigError(backbone_error(cfg, e)) from None
