"""The resume fingerprint (ensiam_fast/checkpoint.py): every setting that changes the math, compared
key by key; a changed one refused naming old -> new, unless allowed on purpose."""

from pathlib import Path

import pytest

from ensiam_fast.checkpoint import CheckpointError, check_fingerprint, fingerprint
from ensiam_fast.config import load_config
from ensiam_fast.config_checks import RESUMABLE_CHANGES

IDENTITY = {"dataset": "digits", "split": "train", "samples": 1000, "content": "abc"}
PATH = Path("RUN/checkpoints/step-00000010.pt")

CHANGES = [  # (override, fingerprint key, new value)
    ("method=simsiam_kaug", "method", "simsiam_kaug"), ("views=2", "views", 2), ("batch_size=32", "batch_size", 32),
    ("gradient_accumulation_steps=2", "gradient_accumulation_steps", 2), ("epochs=7", "epochs", 7),
    ("seed=1", "seed", 1), ("model.backbone=resnet34", "model.backbone", "resnet34"),
    ("model.cifar_stem=true", "model.cifar_stem", True), ("model.proj_layers=3", "model.proj_layers", 3),
    ("model.proj_hidden=64", "model.proj_hidden", 64), ("model.proj_dim=64", "model.proj_dim", 64),
    ("model.pred_hidden=16", "model.pred_hidden", 16), ("model.bn_mode=joint", "model.bn_mode", "joint"),
    ("model.sync_bn=true", "model.sync_bn", True), ("optim.base_lr=1e-3", "optim.base_lr", 1e-3),
    ("optim.momentum=0.5", "optim.momentum", 0.5), ("optim.weight_decay=0", "optim.weight_decay", 0.0),
    ("optim.warmup_epochs=0", "optim.warmup_epochs", 0.0), ("optim.fix_pred_lr=true", "optim.fix_pred_lr", True),
    ("data.preset=strong", "data.preset", "strong"),
    ("data.preset_overrides={blur_p: 1.0}", "data.preset_overrides", {"blur_p": 1.0}),
    ("data.image_size=24", "data.image_size", 24), ("data.backend=torch", "data.backend", "torch"),
]  # fmt: skip


def base():
    return load_config("demo", ["data.image_size=32", "data.backend=dali"])


@pytest.mark.parametrize("override, key, new", CHANGES)
def test_each_changed_key_is_refused_naming_old_and_new(override, key, new):
    saved = fingerprint(base(), IDENTITY, 1, "no")
    changed = fingerprint(load_config("demo", ["data.image_size=32", "data.backend=dali", override]), IDENTITY, 1, "no")
    with pytest.raises(CheckpointError) as e:
        check_fingerprint(saved, changed, [], PATH)
    message = str(e.value)
    assert f"{key} {saved[key]!r} -> {new!r}" in message and "nothing was written" in message
    assert ("resume.allow_changes=[" + key) in message if key in RESUMABLE_CHANGES else "cannot change" in message


@pytest.mark.parametrize("key", ["dataset", "split", "samples", "content"])
def test_another_dataset_is_refused_and_a_moved_one_is_not(key):
    cfg = base()
    saved = fingerprint(cfg, IDENTITY, 1, "no")
    with pytest.raises(CheckpointError, match=f"data.{key} "):
        check_fingerprint(saved, fingerprint(cfg, {**IDENTITY, key: "other"}, 1, "no"), [], PATH)
    moved = load_config("demo", ["data.image_size=32", "data.backend=dali", "data.root=/elsewhere/digits"])
    assert check_fingerprint(saved, fingerprint(moved, IDENTITY, 1, "no"), [], PATH) == []


def test_processes_and_precision_are_part_of_it():
    saved = fingerprint(base(), IDENTITY, 1, "no")
    with pytest.raises(CheckpointError, match="num_processes 1 -> 2"):
        check_fingerprint(saved, fingerprint(base(), IDENTITY, 2, "no"), [], PATH)
    with pytest.raises(CheckpointError, match="mixed_precision 'no' -> 'bf16'"):
        check_fingerprint(saved, fingerprint(base(), IDENTITY, 1, "bf16"), [], PATH)


def test_every_change_is_named_in_one_line():
    saved = fingerprint(base(), IDENTITY, 1, "no")
    changed = fingerprint(load_config("demo", ["data.image_size=32", "seed=3", "epochs=9"]), IDENTITY, 1, "no")
    with pytest.raises(CheckpointError) as e:
        check_fingerprint(saved, changed, [], PATH)
    assert "\n" not in str(e.value) and "seed 0 -> 3" in str(e.value) and "epochs" in str(e.value)
    assert "resume.allow_changes=[" in str(e.value)


def test_allowed_changes_resume_with_a_note_and_settings_outside_it_do_not_matter():
    saved = fingerprint(base(), IDENTITY, 1, "no")
    extended = fingerprint(load_config("demo", ["data.image_size=32", "data.backend=dali", "epochs=9"]), IDENTITY, 1,
                           "no")  # fmt: skip
    (note,) = check_fingerprint(saved, extended, ["epochs"], PATH)
    assert "epochs" in note and "-> 9" in note
    harmless = ["max_steps=3", "log_every=1", "checkpoint_every=5", "knn_every=0", "output_dir=x", "dist_timeout_s=5",
                "data.num_threads=1", "eval_batch_size=8", "keep_checkpoints=1"]  # fmt: skip
    same = fingerprint(load_config("demo", ["data.image_size=32", "data.backend=dali", *harmless]), IDENTITY, 1, "no")
    assert check_fingerprint(saved, same, [], PATH) == []


def test_a_checkpoint_without_a_fingerprint_resumes_with_a_note():
    (note,) = check_fingerprint(None, fingerprint(base(), IDENTITY, 1, "no"), [], PATH)
    assert "no settings fingerprint" in note
