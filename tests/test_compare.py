"""tools/compare.py: the grid, its tables and plot, and its resumability through the real trainer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

import compare  # noqa: E402
import compare_report  # noqa: E402
from compare_grid import GridError, build_grid, read_grid_file  # noqa: E402

from ensiam_fast.checkpoint import latest_checkpoint  # noqa: E402
from ensiam_fast.evaluate.cli import main as evaluate_main  # noqa: E402

# A CPU-sized run on the tiny dataset (48 train / 24 test): timm's test_resnet on 16x16 crops. The
# torch loader: what a grid does is the same with either, and each started DALI process compiles
# its Numba operators again (about 14 s CPU a trainer, five child processes in the end-to-end test).
TINY = [
    "batch_size=8", "epochs=2", "log_every=1", "checkpoint_every=1000", "knn_every=1", "knn_k=5",
    "eval_batch_size=16", "data.image_size=16", "data.num_threads=1", "model.backbone=test_resnet",
    "model.cifar_stem=false", "model.proj_hidden=32", "model.proj_dim=32", "model.pred_hidden=8",
    "mixed_precision=no", "data.backend=torch",
]  # fmt: skip


def grid_argv(out: Path, data: Path, *extra: str) -> list[str]:
    sets = [a for s in [f"data.root={data}", *TINY] for a in ("--set", s)]
    return ["--out", str(out), *sets, "--linear-precomputed", "--linear-epochs", "3", "--linear-batch-size", "8",
            *extra]  # fmt: skip


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


# --------------------------------------------------------------------------------------------- the grid


def test_blocks_expand_dedupe_and_simsiam_runs_with_two_views(tiny_dataset, tmp_path):
    grid = build_grid(
        "demo",
        [f"data.root={tiny_dataset}", *TINY],
        {"epochs": 3},
        [
            {"methods": ["ensiam", "simsiam"], "views": [4, 8], "seeds": [0, 1]},
            {"methods": ["ensiam"], "views": [4], "seeds": [1, 2]},  # ensiam K=4 seed 1 is in both blocks
        ],
        "test",
    )
    names = [r.name for r in grid.runs]
    assert names == [
        "ensiam-k4-default-b8-s0", "ensiam-k4-default-b8-s1", "ensiam-k8-default-b8-s0", "ensiam-k8-default-b8-s1",
        "simsiam-k2-default-b8-s0", "simsiam-k2-default-b8-s1", "ensiam-k4-default-b8-s2",
    ]  # fmt: skip
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {"config": "demo", "set": [f"data.root={tiny_dataset}", *TINY], "blocks": [{"methods": ["fastsiam"]}]}
        )
    )
    assert [r.name for r in read_grid_file(grid_file).runs] == ["fastsiam-k4-default-b8-s0"]  # the config's K, seed


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--methods", "simsiam_kaug", "--views", "3"], "run simsiam_kaug-k3-default-b8-s0: method=simsiam_kaug"),
        (["--methods", "ensaim"], "method='ensaim' is unknown"),
        (["--views", "four"], "views=['four']: every value must be a int"),
        (["--presets", "brutal"], "data.preset='brutal'"),
        (["--jobs", "0"], "--jobs 0"),
        (["--grid", "GRID", "--seeds", "1"], "--grid and --seeds both given"),
    ],
)
def test_a_bad_grid_is_one_error_line_before_anything_runs(tiny_dataset, tmp_path, capsys, args, needle):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("blocks: [{methods: [ensiam]}]\n")
    args = [str(grid_file) if a == "GRID" else a for a in args]
    out = tmp_path / "grid"
    assert compare.main(grid_argv(out, tiny_dataset, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing ran, nothing was written


@pytest.mark.parametrize(
    "text, needle",
    [
        ("blocks: [{methods: [ensiam], K: [4]}]\n", "unknown axis ['K']"),
        ("blocks: {methods: [ensiam]}\n", "'blocks' must be a non-empty list"),
        ("config: demo\n", "must be a mapping with a 'blocks' list"),
        ("blocks: [{methods: [ensiam]}]\nlinear: {epoch: 3}\n", "linear: unknown option ['epoch']"),
        ("blocks: [{methods: [ensiam]}]\nsets: []\n", "unknown key ['sets']"),
        ("blocks: [{methods: [ensiam]\n", "is not valid YAML"),
    ],
)
def test_a_bad_grid_file_names_the_file_and_key(tiny_dataset, tmp_path, capsys, text, needle):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(f"set: [data.root={tiny_dataset}]\n" + text)  # the dataset exists: the file is at fault
    assert compare.main(["--grid", str(grid_file), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"grid file {grid_file}" in err and needle in err, err


def test_missing_dataset_is_reported_before_any_run(tmp_path, capsys):
    assert compare.main(["--out", str(tmp_path / "out"), "--set", f"data.root={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and str(tmp_path / "none") in err and "make_shards" in err
    with pytest.raises(GridError):
        build_grid("demo", [f"data.root={tmp_path / 'none'}"], {}, [{}], "test")


# --------------------------------------------------------------------------------------------- the report


def plant_run(out: Path, method: str, views: int, preset: str, batch: int, seed: int, knn: list, linear: float):
    """A finished run as the grid leaves it: config.yaml, metrics.jsonl, linear.json, compare.json."""
    axes = {"method": method, "views": views, "preset": preset, "batch_size": batch, "seed": seed}
    name = compare.RunSpec(**axes).name
    run = out / "runs" / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": method, "views": views, "batch_size": batch}))
    lines = []
    for epoch, top1 in enumerate(knn):  # 10 steps an epoch, a training line closing each
        if epoch:
            lines.append({"step": 10 * epoch, "epoch": epoch - 1, "loss": -0.5, "images_per_s": 100.0 + seed})
        lines.append({"step": 10 * epoch, "epoch": epoch, "knn_top1": top1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    record = {"top1": linear, "mode": "precomputed"}
    (run / "compare.json").write_text(json.dumps({
        "complete": True, "name": name, "settings": {"axes": axes}, "train": {}, "linear": record,
        "train_s": 10.0, "linear_s": 5.0,
    }))  # fmt: skip
    return run


def test_tables_and_plot_from_planted_runs(tmp_path):
    out = tmp_path / "grid"
    for seed, (lin, knn_end) in enumerate([(80.0, 70.0), (82.0, 72.0), (84.0, 77.0)]):
        plant_run(out, "ensiam", 4, "default", 64, seed, [30.0, 50.0, knn_end], lin)
        plant_run(out, "simsiam_kaug", 4, "default", 64, seed, [30.0, 45.0, knn_end - 5], lin - 10)
        plant_run(out, "ensiam", 4, "very_strong", 64, seed, [30.0, 40.0, 60.0], 70.0 + seed)
    plant_run(out, "ensiam", 8, "default", 64, 0, [30.0, 60.0, 80.0], 90.0)
    plant_run(out, "simsiam", 2, "default", 64, 0, [30.0, 40.0, 50.0], 60.0)
    plant_run(out, "ensiam", 4, "default", 128, 0, [30.0, 40.0, 50.0], 55.0)
    plant_run(out, "ensiam", 4, "strong", 32, 0, [30.0, 40.0, 50.0], 11.0)  # off every table but the lists
    (out / "runs" / "unfinished").mkdir()  # a run still going: no marker, not counted
    report = compare_report.write_report(out)
    assert report["reference"] == {"views": 4, "preset": "default", "batch": 64}
    assert report["tables"] == [
        "Table 4 style: batch size", "Table 5 style: number of views K", "Figure 2 style: augmentation strength",
    ]  # fmt: skip
    text = (out / "results.md").read_text()
    section = text.split("### Table 5")[1].split("###")[0]
    assert "| method | eval | K=2 | K=4 | K=8 |" in section
    # mean and sample std of 80, 82, 84 and of 70, 72, 77; SimSiam sits in the K=2 column
    assert "| ensiam | linear | - | 82.00 ± 2.00 (n=3) | 90.00 (n=1) |" in section
    assert "| ensiam | kNN | - | 73.00 ± 3.61 (n=3) | 80.00 (n=1) |" in section
    assert "| simsiam | linear | 60.00 (n=1) | - | - |" in section
    section = text.split("### Table 4")[1].split("###")[0]
    assert "| ensiam | linear | 82.00 ± 2.00 (n=3) | 55.00 (n=1) |" in section  # batch 64, batch 128
    section = text.split("### Figure 2")[1].split("###")[0]
    assert "| method | eval | preset=default | preset=very_strong |" in section  # strong only at batch 32
    assert "| ensiam | linear | 82.00 ± 2.00 (n=3) | 71.00 ± 1.00 (n=3) |" in section
    assert "| simsiam_kaug | linear | 72.00 ± 2.00 (n=3) | - |" in section
    assert "ensiam-k4-strong-b32-s0" in text and "11.00" in text  # every run is listed
    assert (
        "| ensiam | 4 | default | 64 | 0,1,2 | 82.00 ± 2.00 (n=3) | 73.00 ± 3.61 (n=3) | 30.00 ± 0.00 (n=3) |" in text
    )
    assert "101.00 ± 1.00 (n=3)" in text  # images/s: the medians 100, 101, 102 of the three seeds
    assert "unfinished" not in text
    png = out / "figure3.png"
    assert report["figure"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_without_finished_runs_is_an_error(tmp_path, capsys):
    assert compare.main(["--out", str(tmp_path / "none"), "--report-only"]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_linear_options_of_a_grid_become_evaluate_flags(tmp_path):
    """The grid file's linear mapping, crop_scale included (a list in YAML), as evaluate's flags."""
    grid = compare.Grid("demo", [], {"epochs": 5, "precomputed": False, "crop_scale": [0.2, 1.0]}, [])
    argv = compare.linear_argv(grid, tmp_path / "run")
    assert argv[argv.index("--crop-scale") + 1] == "0.2,1.0"
    assert argv[argv.index("--epochs") + 1] == "5" and "--precomputed" not in argv
    from compare_grid import LINEAR_FLAGS

    assert "crop_scale" in LINEAR_FLAGS  # a grid file may set it (unknown linear options are refused)


def test_a_finished_run_with_other_settings_is_refused(tiny_dataset, tmp_path):
    grid = build_grid("demo", [f"data.root={tiny_dataset}", *TINY], {"epochs": 3}, [{"methods": ["ensiam"]}], "t")
    run = plant_run(tmp_path, "ensiam", 4, "default", 8, 0, [30.0, 40.0], 50.0)
    with pytest.raises(GridError, match="other settings"):  # the planted marker holds no config/set/linear
        compare.run_one(compare.Runner(), grid, grid.runs[0], tmp_path)
    assert (run / "compare.json").is_file()  # and it is left as it was


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_grid_end_to_end_killed_then_resumed(tiny_dataset, tmp_path):
    """Two runs through the real trainer; SIGTERM while the second trains; the rerun skips the first
    (its files untouched) and resumes the second from the checkpoint the signal wrote."""
    out = tmp_path / "grid"
    argv = [sys.executable, str(ROOT / "tools" / "compare.py"),
            *grid_argv(out, tiny_dataset, "--methods", "ensiam", "--views", "2,4")]  # fmt: skip
    first, second = out / "runs" / "ensiam-k2-default-b8-s0", out / "runs" / "ensiam-k4-default-b8-s0"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900  # start-ups take minutes on a loaded 2-core host
    while time.time() < deadline and proc.poll() is None:
        if (second / "metrics.jsonl").exists() and train_steps(second):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "run the same command again to resume" in err
    assert json.loads((first / "compare.json").read_text())["complete"]
    assert not (second / "compare.json").exists()
    _, state = latest_checkpoint(second)
    stopped_at = state["step"]
    # TINY's 2 epochs of 6 steps (was 4 epochs): 12 steps still leave steps on both sides of the signal,
    # and each epoch fewer is a kNN monitor pass and 6 steps less in three trainer processes
    assert 1 <= stopped_at < 12  # stopped mid-run by the signal
    kept = {p: p.stat().st_mtime_ns for p in [*first.rglob("*"), first / "compare.json"] if p.is_file()}

    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert "[1/2] ensiam-k2-default-b8-s0: finished earlier, skipped" in rerun.stdout
    assert "[2/2] ensiam-k4-default-b8-s0: resuming" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the finished run was not touched
    log = (out / "logs" / "ensiam-k4-default-b8-s0.train.log").read_text()
    assert f"resuming from {second / 'checkpoints'}" in log and f"at step {stopped_at}" in log
    assert train_steps(second) == list(range(1, 13))  # every step once, across the kill
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == ["ensiam-k2-default-b8-s0"] and summary["trained"] == ["ensiam-k4-default-b8-s0"]
    assert summary["tables"] == ["Table 5 style: number of views K"]
    table = (out / "results.md").read_text().split("### Table 5")[1].split("###")[0]
    assert "| ensiam | linear | " in table and "| ensiam | kNN | " in table and "K=2 | K=4" in table
    assert (out / "figure3.png").read_bytes()[:4] == b"\x89PNG"
    # each run directory is a normal run: the evaluation command reads it
    assert evaluate_main(["knn", "--run", str(second), "--quiet"]) == 0
    assert json.loads((second / "knn.json").read_text())["step"] == 12
