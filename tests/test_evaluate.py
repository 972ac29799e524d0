"""ensiam_fast/evaluate/: the linear classifier on tensors, and the linear / kNN commands on a tiny run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import copy_run

from ensiam_fast import evaluate
from ensiam_fast.checkpoint import latest_checkpoint, save_checkpoint
from ensiam_fast.config import TrainConfig, config_from_dict
from ensiam_fast.evaluate import (
    LinearSettings,
    classifier_correct,
    cosine_lr,
    linear_evaluate,
    resolve_eval_data,
    train_linear,
)
from ensiam_fast.export import load_backbone
from ensiam_fast.models import build_model


def blobs(n_per_class: int, classes: int, dim: int, seed: int, spread: float = 0.5):
    """Gaussian clusters around random centres: linearly separable up to the noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=gen), labels


@pytest.mark.parametrize("feature_norm", ["none", "bn"])
def test_linear_classifier_separates_separable_features(feature_norm):
    train_x, train_y = blobs(40, 6, 32, seed=0)
    test_x, test_y = blobs(20, 6, 32, seed=1)
    settings = LinearSettings(epochs=15, batch_size=32, lr=0.5, feature_norm=feature_norm)
    head = train_linear(train_x, train_y, 6, settings)
    hits = classifier_correct(head, test_x, test_y)
    # Sizing: 120 test points; the clusters' centres are about 24 apart against a spread of 0.5, so a
    # working classifier is right on all of them and > 0.97 allows 3 misses. The shuffled-label
    # control sits at chance (1/6, binomial SD 0.034 at n = 120): its bound 0.5 is 10 SD above.
    assert hits[1] / test_y.shape[0] > 0.97
    # control: the same training on shuffled labels cannot generalise (chance is 1/6)
    shuffled = train_y[torch.randperm(train_y.shape[0], generator=torch.Generator().manual_seed(0))]
    control = classifier_correct(train_linear(train_x, shuffled, 6, settings), test_x, test_y)
    assert control[1] / test_y.shape[0] < 0.5


def test_train_linear_is_deterministic_and_checks_its_batch():
    x, y = blobs(10, 3, 8, seed=0)
    settings = LinearSettings(epochs=2, batch_size=8, lr=0.1)
    a, b = train_linear(x, y, 3, settings), train_linear(x, y, 3, settings)
    torch.testing.assert_close(a[-1].weight, b[-1].weight, rtol=0, atol=0)
    with pytest.raises(evaluate.EvaluationError, match="larger than the 30 training samples"):
        train_linear(x, y, 3, LinearSettings(batch_size=64))


def test_cosine_lr_and_scaled_lr():
    assert cosine_lr(0, 100, 0.4) == pytest.approx(0.4)
    assert cosine_lr(50, 100, 0.4) == pytest.approx(0.2)
    assert cosine_lr(100, 100, 0.4) == pytest.approx(0.0, abs=1e-12)
    assert LinearSettings(batch_size=512, base_lr=0.1).peak_lr == pytest.approx(0.2)
    assert LinearSettings(batch_size=512, lr=30.0).peak_lr == 30.0
    assert LinearSettings().peak_lr == pytest.approx(0.1)  # the paper's default: base 0.1 at batch 256


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_run):
    """The session's trained run (tests/conftest.py), copied: the commands here write their results
    (knn.json, linear.json) into it."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("evalrun"))


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_knn_command_agrees_with_the_monitor(trained_run, capsys):
    monitor = [json.loads(ln) for ln in (trained_run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in monitor if "knn_top1" in r][-1]
    assert final["step"] == 3
    assert evaluate.main(["knn", "--run", str(trained_run), "--quiet"]) == 0
    printed = last_json(capsys)
    assert printed["step"] == 3 and printed["k"] == 5 and printed["samples"] == 24
    assert printed["top1"] == pytest.approx(final["knn_top1"], abs=1e-9)
    assert printed["top5"] == pytest.approx(final["knn_top5"], abs=1e-9)
    assert json.loads((trained_run / "knn.json").read_text()) == printed


def test_linear_precomputed_command(trained_run, capsys):
    argv = [
        "linear",
        "--run",
        str(trained_run),
        "--precomputed",
        "--epochs",
        "40",
        "--batch-size",
        "16",
        "--lr",
        "1.0",
        "--quiet",
    ]
    assert evaluate.main(argv) == 0
    printed = last_json(capsys)
    assert printed["mode"] == "precomputed" and printed["samples"] == 24 and printed["epochs"] == 40
    # 12 classes, 4 training images each: chance is 8.3%; the colour blobs are easy for these features
    assert printed["top1"] >= 75.0, printed
    assert printed["top5"] >= printed["top1"]
    assert json.loads((trained_run / "linear.json").read_text()) == printed


def test_linear_protocol_keeps_the_backbone_frozen(trained_run):
    path, state = latest_checkpoint(trained_run)
    backbone, cfg = load_backbone(state, path)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rt = evaluate.make_runtime(cfg)
    data = resolve_eval_data(cfg)
    settings = LinearSettings(epochs=2, batch_size=16, lr=0.5)
    result = linear_evaluate(backbone, data, settings, rt, eval_batch_size=16, progress=False)
    assert result["mode"] == "augmented" and result["samples"] == 24  # every test image exactly once
    assert result["train_samples_per_epoch"] == 48 and 0.0 <= result["top1"] <= result["top5"] <= 100.0
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "linear evaluation changed the backbone"
    assert not backbone.training


def test_linear_crop_scale_reaches_the_training_crops(trained_run, monkeypatch, tmp_path, capsys):
    """--crop-scale sets the area range of the linear protocol's training crops (the other reading of
    the paper's "random cropping"), end to end through the command; the test split stays uncropped."""
    import ensiam_fast.evaluate.linear as linear_module

    seen = []
    real = linear_module.build_loader

    def recording(*args, **kwargs):
        seen.append((kwargs["train"], kwargs["preset"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_module, "build_loader", recording)
    out = tmp_path / "linear.json"
    argv = ["linear", "--run", str(trained_run), "--crop-scale", "0.5,0.9", "--epochs", "1", "--batch-size", "16"]
    assert evaluate.main([*argv, "--quiet", "--out", str(out)]) == 0
    printed = last_json(capsys)
    assert printed["mode"] == "augmented" and printed["crop_scale"] == [0.5, 0.9]
    assert json.loads(out.read_text()) == printed
    train_presets = [p for train_, p in seen if train_]
    assert train_presets and all(p.name == "linear" and p.crop_scale == (0.5, 0.9) for p in train_presets)
    assert all(getattr(p, "crop", True) is False for train_, p in seen if not train_)  # eval: resize + centre
    # the default is the linear preset's (torchvision's 0.08-1)
    assert LinearSettings().crop_scale == (0.08, 1.0)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--crop-scale", "0.5"], "--crop-scale must be two numbers"),
        (["--crop-scale", "a,b"], "--crop-scale must be two numbers"),
        (["--crop-scale", "0,1"], "crop_scale=0.0,1.0 must satisfy 0 < low <= high <= 1"),
        (["--crop-scale", "0.9,0.5"], "must satisfy 0 < low <= high"),
        (["--crop-scale", "0.2,1", "--precomputed"], "no effect with --precomputed"),
    ],
)
def test_bad_crop_scale_is_one_error_line(trained_run, tmp_path, capsys, extra, needle):
    out = tmp_path / "never.json"
    assert evaluate.main(["linear", "--run", str(trained_run), "--quiet", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


def write_run(run_dir, tiny_dataset, backbone="resnet18", config_backbone=None):
    cfg = TrainConfig()
    cfg.model.backbone = config_backbone or backbone
    cfg.model.proj_hidden = cfg.model.proj_dim = 16
    cfg.model.pred_hidden = 8
    cfg.data.root, cfg.data.image_size = str(tiny_dataset), 16
    model = build_model(backbone, True, 2, "per_view", 16, 16, 8)
    save_checkpoint(
        run_dir, {"step": 1, "epoch": 0, "batch_in_epoch": 1, "config": cfg.to_dict(), "model": model.state_dict()}
    )
    return config_from_dict(cfg.to_dict())


def test_bad_input_fails_clearly(tmp_path, tiny_dataset, capsys):
    assert evaluate.main(["knn", "--run", str(tmp_path / "nothing")]) == 2
    assert "nothing does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate.main(["knn", "--run", str(tmp_path / "empty")]) == 2
    assert "no readable checkpoint" in capsys.readouterr().err

    write_run(tmp_path / "run", tiny_dataset)
    argv = ["linear", "--run", str(tmp_path / "run"), "--precomputed", "--train-split", "unlabeled"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "'unlabeled'" in err and "unlabelled" in err and "--train-split" in err

    assert evaluate.main(["knn", "--run", str(tmp_path / "run"), "--test-split", "val"]) == 2
    assert "val" in capsys.readouterr().err

    write_run(tmp_path / "other", tiny_dataset, "resnet18", config_backbone="resnet34")
    assert evaluate.main(["knn", "--run", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "'resnet34'" in err and "[2, 2, 2, 2]" in err


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_eval_batch_larger_than_the_split_scores_every_sample_once(tiny_dataset, backend):
    # 360 > the 24 test and 48 train images: each loader gives one short batch instead of an error.
    result = evaluate.knn_evaluate(lambda x: x.flatten(1), root=str(tiny_dataset), train_split="train",
                                   test_split="test", image_size=32, batch_size=360, k=5, backend=backend,
                                   num_threads=0 if backend == "torch" else 1)  # fmt: skip
    assert result["knn_samples"] == 24 and 0.0 <= result["knn_top1"] <= result["knn_top5"] <= 100.0
