"""ensiam_fast/export.py: exported backbones load into fresh timm / torchvision models with the same
features; the detectron2 pickle follows MoCo's key names; bad input fails with a clear error."""

from __future__ import annotations

import json
import pickle

import pytest
import timm
import torch
import torchvision

from ensiam_fast.checkpoint import save_checkpoint
from ensiam_fast.config import TrainConfig
from ensiam_fast.export import (
    ExportError,
    detectron2_key,
    load_timm_backbone,
    load_torchvision_backbone,
    main,
    meta_path,
)
from ensiam_fast.models import build_model


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BatchNorm buffer random values, so a swapped or dropped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.rand(t.shape, generator=gen)
                t.copy_(noise + 0.5 if name.endswith("running_var") else (noise - 0.5) * 0.2 + t)
            else:
                t.fill_(7)
    return model


def make_run(run_dir, backbone="resnet18", cifar_stem=True, *, config_backbone=None, wrap_prefix=""):
    """A run directory with one checkpoint of a freshly built (randomised) small-headed model."""
    cfg = TrainConfig()
    cfg.model.backbone, cfg.model.cifar_stem = config_backbone or backbone, cifar_stem
    cfg.model.proj_hidden = cfg.model.proj_dim = 16
    cfg.model.pred_hidden = 8
    model = randomize_(build_model(backbone, cifar_stem, 2, "per_view", 16, 16, 8))
    state = {wrap_prefix + k: v for k, v in model.state_dict().items()}
    save_checkpoint(run_dir, {"step": 12, "epoch": 1, "batch_in_epoch": 2, "config": cfg.to_dict(), "model": state})
    return model.eval()


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run18")
    return run, make_run(run)


def images(size=32, n=2, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_timm_export_gives_the_same_features(cifar_run, tmp_path, capsys):
    run, model = cifar_run
    out = tmp_path / "r18.safetensors"
    assert main(["--run", str(run), "--format", "timm", "--out", str(out)]) == 0
    assert '"library": "timm"' in capsys.readouterr().out.splitlines()[-1]
    loaded = load_timm_backbone(out).eval()
    assert isinstance(loaded.maxpool, torch.nn.Identity) and loaded.conv1.kernel_size == (3, 3)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.features(x), rtol=1e-5, atol=1e-5)
    meta = json.loads(meta_path(out).read_text())
    assert meta["model"] == "resnet18" and meta["stem"] == "cifar" and meta["feature_dim"] == 512
    assert meta["source"]["step"] == 12 and meta["source"]["run"] == str(run)
    # the keys are exactly timm's own (after the stem patch): nothing of the heads
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == set(loaded.state_dict())


def test_torchvision_export_gives_the_same_features(cifar_run, tmp_path):
    run, model = cifar_run
    out = tmp_path / "r18.pth"
    assert main(["--run", str(run), "--format", "torchvision", "--out", str(out)]) == 0
    loaded = load_torchvision_backbone(out).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.features(x), rtol=1e-5, atol=1e-5)
    # the documented manual way: patch the stem of a stock resnet18, strict=False misses only fc.*
    stock = torchvision.models.resnet18(weights=None)
    stock.conv1 = torch.nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    stock.maxpool = torch.nn.Identity()
    result = stock.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_compiled_ddp_prefixes_are_stripped(tmp_path):
    model = make_run(tmp_path / "run", wrap_prefix="module._orig_mod.")
    out = tmp_path / "r18.safetensors"
    assert main(["--run", str(tmp_path / "run"), "--format", "timm", "--out", str(out)]) == 0
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(load_timm_backbone(out).eval()(x), model.features(x), rtol=1e-5, atol=1e-5)


def test_detectron2_names_follow_moco(tmp_path):
    model = make_run(tmp_path / "run50", "resnet50", cifar_stem=False)
    out = tmp_path / "r50.pkl"
    assert main(["--run", str(tmp_path / "run50"), "--format", "detectron2", "--out", str(out)]) == 0
    with open(out, "rb") as f:
        payload = pickle.load(f)
    assert payload["matching_heuristics"] is True and "__author__" in payload
    names = payload["model"]
    for expected in (
        "stem.conv1.weight",
        "stem.conv1.norm.running_var",
        "res2.0.conv1.weight",
        "res2.0.conv3.norm.bias",
        "res2.0.shortcut.weight",
        "res2.0.shortcut.norm.running_mean",
        "res3.3.conv2.norm.weight",
        "res4.5.conv1.weight",
        "res5.2.conv3.norm.running_mean",
        "res5.0.shortcut.norm.weight",
    ):
        assert expected in names, expected
    assert not any(k.startswith("layer") or ".bn" in k or "downsample" in k or "num_batches" in k for k in names)
    source = {k: v for k, v in model.backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(names) == len(source)  # every tensor once (the renaming is injective)
    for key, value in source.items():
        assert (names[detectron2_key(key)] == value.numpy()).all(), key


def test_detectron2_key_examples():
    assert detectron2_key("bn1.weight") == "stem.conv1.norm.weight"
    assert detectron2_key("layer4.1.bn2.running_var") == "res5.1.conv2.norm.running_var"
    assert detectron2_key("layer1.0.downsample.1.bias") == "res2.0.shortcut.norm.bias"


@pytest.mark.parametrize(
    ("backbone", "cifar_stem", "fmt", "message"),
    [
        ("resnet18", True, "detectron2", "CIFAR stem"),
        ("resnet18", False, "detectron2", "bottleneck"),
        ("resnet10t", False, "torchvision", "use --format timm"),
    ],
)
def test_formats_that_cannot_hold_the_backbone(tmp_path, capsys, backbone, cifar_stem, fmt, message):
    make_run(tmp_path / "run", backbone, cifar_stem)
    out = tmp_path / "out.bin"
    assert main(["--run", str(tmp_path / "run"), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and backbone in err
    assert not out.exists() and not meta_path(out).exists()


def test_checkpoint_of_another_backbone(tmp_path, capsys):
    make_run(tmp_path / "run", "resnet18", config_backbone="resnet34")
    assert main(["--run", str(tmp_path / "run"), "--format", "timm", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'resnet34'" in err and "[2, 2, 2, 2]" in err and "[3, 4, 6, 3]" in err


def test_run_without_checkpoints(tmp_path, capsys):
    assert main(["--run", str(tmp_path), "--format", "timm", "--out", str(tmp_path / "x")]) == 2
    assert "no readable checkpoint" in capsys.readouterr().err


def test_loading_needs_the_metadata(cifar_run, tmp_path):
    out = tmp_path / "r18.safetensors"
    assert main(["--run", str(cifar_run[0]), "--format", "timm", "--out", str(out)]) == 0
    meta_path(out).unlink()
    with pytest.raises(ExportError, match="not found"):
        load_timm_backbone(out)


def test_standard_stem_timm_export_matches_plain_timm(tmp_path):
    """A standard-stem export loads into timm.create_model(name, num_classes=0) with no patching."""
    model = make_run(tmp_path / "run", "resnet18", cifar_stem=False)
    out = tmp_path / "r18.safetensors"
    assert main(["--run", str(tmp_path / "run"), "--format", "timm", "--out", str(out)]) == 0
    from safetensors.torch import load_file

    plain = timm.create_model("resnet18", num_classes=0, pretrained=False)
    plain.load_state_dict(load_file(str(out)), strict=True)
    x = images(size=64)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model.features(x), rtol=1e-5, atol=1e-5)


def test_a_diverged_checkpoint_is_refused_by_export_and_evaluate(tmp_path, capsys):
    """A checkpoint written before the trainer checked for inf (a BatchNorm running_var overflowed):
    export and evaluation name the tensor instead of reporting chance-level features."""
    from ensiam_fast.checkpoint import latest_checkpoint, save_checkpoint
    from ensiam_fast.evaluate import main as evaluate_main

    make_run(tmp_path / "run")
    _, state = latest_checkpoint(tmp_path / "run")
    key = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][key][0] = float("inf")
    save_checkpoint(tmp_path / "run", {**state, "step": 13})
    assert main(["--run", str(tmp_path / "run"), "--format", "timm", "--out", str(tmp_path / "x")]) == 2
    assert "running_var holds inf or NaN" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert evaluate_main(["knn", "--run", str(tmp_path / "run")]) == 2
    assert "running_var holds inf or NaN" in capsys.readouterr().err
