"""Config values as a user types them (ensiam_fast/config.py): exponents without a dot, underscores,
a leading dot; non-finite values refused; a key given twice in a YAML file is an error."""

import pytest

from ensiam_fast.config import load_config
from ensiam_fast.errors import ConfigError


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("optim.base_lr=1e-3", "base_lr", 1e-3),
        ("optim.base_lr=5E-4", "base_lr", 5e-4),
        ("optim.base_lr=.5", "base_lr", 0.5),
        ("optim.weight_decay=1e-4", "weight_decay", 1e-4),
        ("optim.warmup_epochs=1_000", "warmup_epochs", 1000.0),
        ("optim.base_lr=2", "base_lr", 2.0),
        ("optim.base_lr=1.5e+2", "base_lr", 150.0),
    ],
)
def test_numbers_on_the_command_line(override, key, expected):
    value = getattr(load_config("demo", [override]).optim, key)
    assert isinstance(value, float) and value == expected


def test_numbers_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval_batch_size: 1_000\noptim:\n  base_lr: 1e-3\n  weight_decay: 5E-4\n  momentum: .5\n")
    cfg = load_config(path)
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.momentum) == (1e-3, 5e-4, 0.5)
    assert cfg.eval_batch_size == 1000
    assert load_config(path, ["data.preset_overrides={blur_p: 5e-1}"]).data.preset_overrides == {"blur_p": 0.5}


def test_text_stays_text():
    assert load_config("demo", ["output_dir=1e3"]).output_dir == "1e3"
    assert load_config("demo", ["mixed_precision=no"]).mixed_precision == "no"


@pytest.mark.parametrize(
    "override", ["dist_timeout_s=.inf", "optim.base_lr=.nan", "knn_t=-.inf", "optim.base_lr=1e999"]
)
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="finite"):
        load_config("demo", [override])


def test_a_key_given_twice_names_the_key_and_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\noptim:\n  base_lr: 1e-3\n  momentum: 0.9\n  base_lr: 2e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: key 'base_lr' is given twice (lines 3 and 5); keep one"


def test_resume_allow_changes_takes_only_safe_keys():
    assert load_config("demo", ["resume.allow_changes=[epochs,seed]"]).resume.allow_changes == ["epochs", "seed"]
    with pytest.raises(ConfigError, match="resume.allow_changes names \\['views'\\]"):
        load_config("demo", ["resume.allow_changes=[views]"])


@pytest.mark.parametrize("value", ["1e300", "0", "-5"])
def test_dist_timeout_is_a_number_of_seconds_a_deadline_can_hold(value):
    with pytest.raises(ConfigError, match="dist_timeout_s=.* must be > 0 seconds and at most a year"):
        load_config("demo", [f"dist_timeout_s={value}"])
