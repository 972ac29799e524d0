"""Export the pretrained backbone alone: no projector, predictor or optimizer state.

    python -m ensiam_fast.export --run runs/cifar10 --format timm --out resnet18.safetensors
    python -m ensiam_fast.export --checkpoint runs/in1k/checkpoints/step-00100000.pt \\
        --format detectron2 --out r50.pkl

Every format writes a small JSON next to the weights (``FILE.json``: ``resnet18.safetensors.json``)
with the model name, the stem (``cifar`` or ``standard``), the feature dimension and the source
run, checkpoint and step.

``timm`` (safetensors). The keys are those of ``timm.create_model(name, num_classes=0)`` after the
stem adjustment. A CIFAR-stem backbone (the paper's small-dataset ResNet-18) replaces ``conv1`` by
a 3x3 stride-1 convolution (padding 1, no bias) and ``maxpool`` by ``nn.Identity()`` before loading;
:func:`load_timm_backbone` does all of it and loads strictly::

    from ensiam_fast.export import load_timm_backbone
    model = load_timm_backbone("resnet18.safetensors").eval()   # (N, 3, H, W) -> (N, 512)

``torchvision`` (``torch.save`` state dict). timm's ResNet family uses torchvision's key names
(``conv1``, ``bn1``, ``layerN.M.convK``/``bnK``, ``layerN.M.downsample.{0,1}``), so the keys are
unchanged; the file has no ``fc.*`` (there is no classifier). Load it into a model whose ``fc`` is
``nn.Identity()`` (pooled features out) with ``strict=True``, after patching a CIFAR stem the same
way; :func:`load_torchvision_backbone` does this. To train a classifier instead, load with
``strict=False`` and check that the only missing keys are ``fc.weight`` and ``fc.bias``.

``detectron2`` (pickle). The layout MoCo and SimSiam publish for detection transfer (the paper's
Table 3): ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}`` with
the names Detectron2's ResNet uses: ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``,
``layerN`` -> ``res{N+1}``, ``bnK`` -> ``convK.norm``, ``downsample.0``/``.1`` -> ``shortcut``/
``shortcut.norm``; ``num_batches_tracked`` is dropped (Detectron2's frozen BatchNorm has none).
Only for standard-stem bottleneck ResNets (resnet50/101/152, wide/ResNeXt variants). In Detectron2
set ``MODEL.RESNETS.STRIDE_IN_1X1=False`` (the stride sits in the 3x3 conv, torchvision style),
``INPUT.FORMAT=RGB`` and the ImageNet mean/std in pixels (as MoCo's detection configs do).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ensiam_fast.checkpoint import resolve_checkpoint
from ensiam_fast.command import argument_parser
from ensiam_fast.config import TrainConfig, config_from_dict
from ensiam_fast.errors import ConfigError, UserError
from ensiam_fast.rundir import atomic_write, check_target
from ensiam_fast.runlock import owning
from ensiam_fast.stems import apply_cifar_stem, create_backbone
from ensiam_fast.stopping import first_non_finite

FORMATS = ("timm", "torchvision", "detectron2")
META_FORMAT = "ensiam_fast-backbone/1"


class ExportError(UserError):
    """A checkpoint or format that cannot be exported; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# checkpoint -> backbone


def strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's leading ``module.`` and torch.compile's ``_orig_mod.`` from every key."""
    out = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p != "_orig_mod"]
        while parts and parts[0] == "module":
            parts = parts[1:]
        out[".".join(parts)] = value
    return out


def backbone_weights(model_state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a SiameseNet state dict, without the prefix."""
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in strip_wrappers(model_state).items() if k.startswith(prefix)}
    if not weights:
        raise ExportError(f"{where}: the model state has no 'backbone.*' entries; is it an ensiam_fast checkpoint?")
    return weights


def describe_weights(weights: dict[str, torch.Tensor]) -> str:
    """A short description of what network a ResNet-like state dict holds (for error messages)."""
    blocks: dict[int, set[int]] = {}
    for key in weights:
        m = re.match(r"layer(\d+)\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    parts = [f"{len(weights)} tensors"]
    if blocks:
        parts.append(f"blocks per stage {[len(blocks[s]) for s in sorted(blocks)]}")
        parts.append("bottleneck blocks" if any(".conv3." in k for k in weights) else "basic blocks")
    conv1 = weights.get("conv1.weight")
    if conv1 is not None:
        stem = "CIFAR stem" if tuple(conv1.shape[-2:]) == (3, 3) else "standard stem"
        parts.append(f"conv1.weight {tuple(conv1.shape)} ({stem})")
    return ", ".join(parts)


def load_weights_strict(model: nn.Module, weights: dict[str, torch.Tensor], *, what: str, where: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names both sides of a mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            detail.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:2])})")
        raise ExportError(
            f"the weights in {where} do not fit {what}: {'; '.join(detail)}. The file holds "
            f"{describe_weights(weights)}; {what} expects {describe_weights(expected)}."
        )
    model.load_state_dict(weights, strict=True)


def stem_name(cifar_stem: bool) -> str:
    return "cifar" if cifar_stem else "standard"


def load_backbone(state: dict[str, Any], path: str | os.PathLike) -> tuple[nn.Module, TrainConfig]:
    """The checkpoint's backbone as a timm model (its config's name and stem), weights loaded strictly,
    in eval mode with gradients off."""
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise ExportError(f"{path}: the config stored in the checkpoint is invalid: {e}") from e
    name, cifar = cfg.model.backbone, cfg.model.cifar_stem
    try:
        backbone = create_backbone(name, cifar)
    except ValueError as e:
        raise ExportError(f"{path}: cannot build backbone {name!r}: {e}") from e
    what = f"backbone {name!r} ({stem_name(cifar)} stem) named by the checkpoint's config"
    load_weights_strict(backbone, backbone_weights(state["model"], str(path)), what=what, where=str(path))
    bad = first_non_finite(backbone)  # a checkpoint of a diverged run, saved before the trainer checked
    if bad is not None:
        raise ExportError(
            f"{path}: the backbone's {bad} holds inf or NaN (the run diverged before this step); its features "
            "mean nothing: use an earlier checkpoint (--checkpoint RUN/checkpoints/step-N.pt)"
        )
    backbone.eval().requires_grad_(False)
    return backbone, cfg


def source_info(path: Path, state: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return {
        "run": str(run),
        "checkpoint": str(path),
        "step": int(state["step"]),
        "epoch": int(state["epoch"]),
        "method": cfg.method if cfg else state["config"].get("method"),
        "views": cfg.views if cfg else state["config"].get("views"),
        "data": cfg.data.root if cfg else state["config"].get("data", {}).get("root"),
    }


# ---------------------------------------------------------------------------------------------
# formats


def meta_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def _write_atomic(path: Path, write) -> None:
    """``write(f)`` into ``path`` through the one writer (ensiam_fast/rundir.py)."""
    check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        write(f)


def write_meta(out: Path, meta: dict[str, Any]) -> Path:
    path = meta_path(out)
    _write_atomic(path, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return path


def export_timm(backbone: nn.Module, out: Path) -> None:
    # safetensors refuses shared or strided storage: give it plain contiguous copies
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    from safetensors.torch import save

    _write_atomic(out, lambda f: f.write(save(tensors, metadata={"format": "pt"})))


def torchvision_model(name: str, cifar_stem: bool) -> nn.Module:
    """An untrained torchvision model of that name, stem patched, ``fc`` replaced by Identity."""
    import torchvision

    name = name.partition(".")[0]  # a timm pretrained tag (resnet18.a1_in1k) names no other architecture
    builder = getattr(torchvision.models, name, None)
    if builder is None or not callable(builder):
        raise ExportError(
            f"torchvision has no model named {name!r}; the torchvision format holds the ResNets "
            "that torchvision and timm share (resnet18/34/50/101/152, wide_resnet50_2, "
            "resnext50_32x4d, ...): use --format timm"
        )
    model = builder(weights=None)
    if not hasattr(model, "fc"):
        raise ExportError(f"torchvision's {name!r} is not a ResNet (no 'fc'); use --format timm")
    model.fc = nn.Identity()
    return apply_cifar_stem(model) if cifar_stem else model


def export_torchvision(backbone: nn.Module, name: str, cifar_stem: bool, out: Path) -> None:
    weights = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    # Prove the file loads before writing it: the same keys and shapes as torchvision's model.
    try:
        load_weights_strict(
            torchvision_model(name, cifar_stem),
            weights,
            what=f"torchvision.models.{name}",
            where=f"the {name!r} backbone",
        )
    except ExportError as e:
        raise ExportError(f"{e} timm's {name!r} is not torchvision's architecture: use --format timm") from None
    _write_atomic(out, lambda f: torch.save(weights, f))


def detectron2_key(key: str) -> str:
    """torchvision-style ResNet key -> Detectron2 ResNet key (MoCo's convert-pretrain-to-detectron2 names)."""
    if not key.startswith("layer"):
        key = "stem." + key  # conv1, bn1
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"\bbn(\d)\b", r"conv\1.norm", key)
    key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    return key


def detectron2_weights(backbone: nn.Module, name: str, cifar_stem: bool) -> dict[str, Any]:
    if cifar_stem:
        raise ExportError(
            f"{name!r} was trained with the CIFAR stem (3x3 stride-1 conv1, no max-pool), but "
            "Detectron2's ResNet stem is a 7x7 stride-2 conv with a max-pool, so the weights cannot "
            "be loaded there; use --format timm or torchvision"
        )
    weights = backbone.state_dict()
    torchvision_like = all(re.match(r"(conv1|bn1|layer[1-4]\.)", k) for k in weights)
    if not torchvision_like or not any(".conv3." in k for k in weights):
        raise ExportError(
            f"the detectron2 format holds bottleneck ResNets (resnet50/101/152 and wide/ResNeXt "
            f"variants), as MoCo/SimSiam detection transfer uses; {name!r} has "
            f"{describe_weights(weights)}; use --format timm"
        )
    return {
        detectron2_key(k): v.detach().cpu().numpy() for k, v in weights.items() if not k.endswith("num_batches_tracked")
    }


def export_detectron2(backbone: nn.Module, name: str, cifar_stem: bool, out: Path) -> None:
    payload = {
        "model": detectron2_weights(backbone, name, cifar_stem),
        "__author__": "ensiam_fast",
        "matching_heuristics": True,
    }

    _write_atomic(out, lambda f: pickle.dump(payload, f))


def export_backbone(run=None, checkpoint=None, *, fmt: str, out: str | os.PathLike) -> dict[str, Any]:
    """Write the backbone of a run's newest (or the given) checkpoint; returns the metadata written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; one of {FORMATS}")
    path, state = resolve_checkpoint(run, checkpoint)
    backbone, cfg = load_backbone(state, path)
    out = Path(out)
    for target in (out, meta_path(out)):  # both refused before either is written
        check_target(target)
    with owning(out.parent):  # a run directory written into has one owner
        return _export(backbone, cfg, path, state, fmt, out)


def _export(backbone, cfg, path, state, fmt: str, out: Path) -> dict[str, Any]:
    name, cifar = cfg.model.backbone, cfg.model.cifar_stem
    if fmt == "timm":
        export_timm(backbone, out)
    elif fmt == "torchvision":
        export_torchvision(backbone, name, cifar, out)
    else:
        export_detectron2(backbone, name, cifar, out)
    meta = {
        "format": META_FORMAT,
        "library": fmt,
        "model": name,
        "stem": stem_name(cifar),
        "feature_dim": int(backbone.num_features),
        "file": out.name,
        "source": source_info(path, state, cfg),
    }
    write_meta(out, meta)
    return meta


# ---------------------------------------------------------------------------------------------
# loading exported files


def read_meta(path: str | os.PathLike, library: str) -> dict[str, Any]:
    mpath = meta_path(path)
    try:
        meta = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ExportError(
            f"{mpath} not found: the model name and stem of {path} are stored there "
            "(written by python -m ensiam_fast.export)"
        ) from None
    if meta.get("format") != META_FORMAT or meta.get("library") != library:
        raise ExportError(
            f"{mpath} does not describe a {library} export of ensiam_fast "
            f"(format {meta.get('format')!r}, library {meta.get('library')!r})"
        )
    return meta


def load_timm_backbone(path: str | os.PathLike) -> nn.Module:
    """A timm model (``num_classes=0``) with the exported weights; stem from ``FILE.json``; strict."""
    import timm
    from safetensors.torch import load_file

    meta = read_meta(path, "timm")
    model = timm.create_model(meta["model"], num_classes=0, pretrained=False)
    if meta["stem"] == "cifar":
        apply_cifar_stem(model)
    load_weights_strict(
        model, load_file(str(path)), what=f"timm model {meta['model']!r} ({meta['stem']} stem)", where=str(path)
    )
    return model


def load_torchvision_backbone(path: str | os.PathLike) -> nn.Module:
    """A torchvision ResNet with ``fc = Identity`` (pooled features out), stem patched, loaded strictly."""
    meta = read_meta(path, "torchvision")
    model = torchvision_model(meta["model"], meta["stem"] == "cifar")
    weights = torch.load(path, map_location="cpu", weights_only=True)
    load_weights_strict(
        model, weights, what=f"torchvision.models.{meta['model']} ({meta['stem']} stem)", where=str(path)
    )
    return model


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser("python -m ensiam_fast.export", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory: its newest complete checkpoint is exported")
    source.add_argument("--checkpoint", help="a checkpoint file (RUN/checkpoints/step-XXXXXXXX.pt)")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--out", required=True, help="output file (its metadata goes to OUT.json)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        meta = export_backbone(args.run, args.checkpoint, fmt=args.fmt, out=args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "meta": str(meta_path(args.out)), **meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
