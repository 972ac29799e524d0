"""What a run leaves and says: curves.png, the closing lines, a finished run rerun, --help, the path rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg

from ensiam_fast import paths, train
from ensiam_fast.config import TrainConfig, load_config
from ensiam_fast.shards import cli

TINY = [
    "batch_size=8", "epochs=1", "knn_every=1", "knn_k=5", "eval_batch_size=16", "log_every=1",
    "checkpoint_every=1000", "data.image_size=16", "data.num_threads=1", "data.backend=torch",
    "model.proj_hidden=32", "model.proj_dim=32", "model.pred_hidden=8", "model.channels_last=false",
    "optim.warmup_epochs=0", "mixed_precision=no", "log_with=none",
]  # fmt: skip


def keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += keys(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "preset_overrides" else [prefix + k]
    return out


def test_finished_run_rerun_says_complete_and_adds_nothing(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "run"
    argv = ["--config", "demo", f"data.root={tiny_dataset}", f"output_dir={out}", "max_steps=2", *TINY]
    assert train.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert lines[-2] == f"run directory {out}: {', '.join(summary['files'])}"
    assert {"config.yaml", "metrics.jsonl", "curves.png", "checkpoints/", "checkpoints/step-00000002.pt"} <= set(
        summary["files"]
    )
    image = mpimg.imread(out / "curves.png")
    assert image.shape[0] > 300 and image.shape[1] > 300
    before = (out / "metrics.jsonl").read_bytes()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())

    assert train.main(argv) == 0
    text = capsys.readouterr().out
    assert "run already complete at step 2" in text
    rerun = json.loads(text.strip().splitlines()[-1])
    assert rerun["already_complete"] is True and rerun["final_step"] == 2
    assert (out / "metrics.jsonl").read_bytes() == before  # no duplicate kNN or loss record
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints


def test_help_lists_every_config_key_with_its_default_and_comment(capsys):
    try:
        train.parse_args(["--help"])
    except SystemExit as e:
        assert e.code == 0
    text = capsys.readouterr().out
    defaults = TrainConfig()
    for key in keys(defaults.to_dict()):
        section, _, name = key.rpartition(".")
        value = getattr(getattr(defaults, section) if section else defaults, name)
        if value is None or isinstance(value, (bool, dict)):
            shown = {"None": "null", "True": "true", "False": "false", "{}": "{}"}[str(value)]
        else:
            shown = value
        line = f"  {key}={shown}\n      "
        assert line in text, key  # the key, its default, and an indented comment line after it


def test_demo_data_is_found_from_another_directory(tmp_path, tiny_dataset, monkeypatch, capsys):
    """make_shards' default output and a relative data.root name the same folder from any directory."""
    project = tmp_path / "project"
    monkeypatch.setattr(paths, "PROJECT_ROOT", project)
    monkeypatch.setattr(cli, "DEFAULT_SHARDS", project / "shards")  # make_shards.py's command line
    assert cli.parse_args(["--dataset", "digits"]).out == project / "shards" / "digits"
    shutil.copytree(tiny_dataset, project / "shards" / "digits")  # stands in for the converted digits
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config("demo").data.root == str(project / "shards" / "digits")
    assert train.main(["--config", "demo", "output_dir=runs/demo", "max_steps=1", "knn_every=0", *TINY]) == 0
    assert (elsewhere / "runs" / "demo" / "curves.png").is_file()
    capsys.readouterr()
    # a data.root found nowhere stays as given, so the error names it
    assert train.main(["--config", "demo", "data.root=shards/nope", "output_dir=runs/x", *TINY]) == 2
    assert "shards/nope" in capsys.readouterr().err


def test_a_missing_run_directory_is_named(tmp_path, capsys):
    from ensiam_fast.evaluate import main as evaluate_main

    assert evaluate_main(["knn", "--run", str(tmp_path / "nope")]) == 2
    assert "nope does not exist" in capsys.readouterr().err


def test_paths_resolve_relative_to_the_working_directory_first(tmp_path, monkeypatch):
    (tmp_path / "shards" / "digits").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_data_root("shards/digits") == str(tmp_path / "shards" / "digits")
    assert paths.resolve_data_root("/abs/x") == "/abs/x"
    assert Path(paths.resolve_data_root("no/such")) == Path("no/such")
