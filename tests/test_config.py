import pytest

from ensiam_fast.config import config_from_dict, load_config
from ensiam_fast.config_parse import parse_overrides
from ensiam_fast.errors import ConfigError

PRESETS = ["cifar10", "cifar100", "stl10", "tiny_imagenet", "imagenet", "demo"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_carry_paper_settings(name):
    cfg = load_config(name)
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    if name != "demo":
        # Section 4.1: batch 256, 200 epochs, K=4, base lr 0.1, 10 warm-up epochs.
        assert (cfg.batch_size, cfg.epochs, cfg.views) == (256, 200, 4)
        assert (cfg.optim.base_lr, cfg.optim.warmup_epochs) == (0.1, 10)
        assert (cfg.model.proj_hidden, cfg.model.proj_dim, cfg.model.pred_hidden) == (2048, 2048, 512)
    if name == "imagenet":
        assert (cfg.model.backbone, cfg.model.cifar_stem, cfg.model.proj_layers) == ("resnet50", False, 3)
    elif name == "demo":
        # CPU-sized on purpose: the standard stem costs 16x fewer FLOPs than the CIFAR stem at 32x32.
        assert (cfg.model.backbone, cfg.model.cifar_stem, cfg.model.proj_layers) == ("resnet18", False, 2)
    else:
        assert (cfg.model.backbone, cfg.model.cifar_stem, cfg.model.proj_layers) == ("resnet18", True, 2)
    if name == "stl10":
        assert cfg.data.split == "train+unlabeled"  # 105k images, the common practice (issue 10)


def test_overrides_nested_and_typed():
    cfg = load_config(
        "cifar10",
        ["output_dir=/tmp/x", "epochs=3", "max_steps=7", "method=simsiam_kaug", "views=6", "batch_size=32",
         "seed=5", "data.root=/d", "data.preset=strong", "optim.base_lr=1", "model.compile=true"],
    )  # fmt: skip
    assert (cfg.output_dir, cfg.epochs, cfg.max_steps, cfg.method, cfg.views) == ("/tmp/x", 3, 7, "simsiam_kaug", 6)
    assert (cfg.batch_size, cfg.seed, cfg.data.root, cfg.data.preset) == (32, 5, "/d", "strong")
    assert isinstance(cfg.optim.base_lr, float) and cfg.optim.base_lr == 1.0
    assert cfg.model.compile is True
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["epoch=3"], "'epoch' (did you mean epochs"),
        (["epochs=three"], "'epochs' expects int"),
        (["optim.base_lr=fast"], "'optim.base_lr' expects float"),
        (["model.bn_mod=joint"], "'model.bn_mod' (did you mean model.bn_mode"),
        (["method=simsiam_kaug", "views=3"], "views must be even"),
        (["method=simsiam", "views=4"], "exactly 2 views"),
        (["method=byol"], "method='byol' is unknown"),
        (["views=1"], "2 to 16 views"),
        (["views=17"], "2 to 16 views"),
        (["data=x"], "'data' is a section"),
        (["novalue"], "key=value"),
        (["model.bn_mode=both"], "model.bn_mode='both'"),
    ],
)
def test_bad_config_fails_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("cifar10", overrides)
    assert needle in str(e.value)


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'model\.widht'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_preset")


def test_parse_overrides_tree():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": "1", "c": "x"}, "d": "[1, 2]"}


def test_text_values_stay_text_for_str_keys():
    # YAML would read these as False / 1.0 / None; a str key keeps the text as typed.
    cfg = load_config("demo", ["mixed_precision=no", "output_dir=1.0", "data.knn_test_split=null"])
    assert (cfg.mixed_precision, cfg.output_dir, cfg.data.knn_test_split) == ("no", "1.0", "null")
    assert load_config("demo", ["max_steps=null"]).max_steps is None
    assert load_config("demo", ["data.preset_overrides={blur_p: 1.0}"]).data.preset_overrides == {"blur_p": 1.0}
