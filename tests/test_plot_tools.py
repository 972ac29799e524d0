"""tools/plot_metrics.py, tools/results_table.py and their run reader (tools/runlog.py) on fabricated runs."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import yaml

TOOLS = Path(__file__).resolve().parents[1] / "tools"

import plot_metrics  # noqa: E402
import results_table  # noqa: E402
import runlog  # noqa: E402


def fabricate_run(
    path: Path,
    method: str,
    views: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    log_every: int,
    speed: float,
    data_root: str = "/nonexistent/shards/cifar10",
) -> Path:
    """A run directory as the trainer writes it: training lines every ``log_every`` steps and at each
    epoch's last batch (epoch = the epoch in progress), kNN lines at the start and at each epoch end."""
    path.mkdir(parents=True)
    config = {
        "method": method,
        "views": views,
        "batch_size": 64,
        "epochs": epochs,
        "data": {"root": data_root, "split": "train"},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": 0, "epoch": 0, "knn_top1": 10.0, "knn_top5": 50.0, "knn_samples": 100}]
    total = steps_per_epoch * epochs
    for step in range(1, total + 1):
        epoch, in_epoch = divmod(step - 1, steps_per_epoch)
        if step % log_every == 0 or in_epoch + 1 == steps_per_epoch:
            lines.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": -0.9 * step / total,
                    "lr": 0.05 * (1 - step / total),
                    "images_per_s": speed + step % 3,
                    "data_wait": 0.1,
                    "collapse_std": 0.02,
                }
            )
        if in_epoch + 1 == steps_per_epoch:
            lines.append(
                {
                    "step": step,
                    "epoch": epoch + 1,
                    "knn_top1": 10.0 + 20 * (epoch + 1),
                    "knn_top5": 60.0,
                    "knn_samples": 100,
                }
            )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture
def two_runs(tmp_path):
    a = fabricate_run(tmp_path / "ensiam_k4", "ensiam", 4, steps_per_epoch=7, epochs=3, log_every=5, speed=100)
    b = fabricate_run(tmp_path / "simsiam", "simsiam", 2, steps_per_epoch=7, epochs=2, log_every=5, speed=300)
    (a / "linear.json").write_text(json.dumps({"top1": 71.25, "top5": 95.0, "mode": "augmented"}))
    return a, b


def test_steps_per_epoch_comes_from_an_epoch_end_line(two_runs):
    run = runlog.read_run(two_runs[0])
    assert run.steps_per_epoch == 7  # log_every=5 does not divide 7: only the epoch-end line says it
    epochs, values = run.series("knn_top1")
    assert epochs == [0.0, 1.0, 2.0, 3.0] and values == [10.0, 30.0, 50.0, 70.0]
    x, _ = run.series("loss")
    assert x[0] == pytest.approx(5 / 7)  # step 5 lies inside epoch 0, not at epoch 0


def test_steps_per_epoch_falls_back_to_the_manifest(tmp_path, tiny_dataset):
    # 3 steps of an epoch of 48 // 16 = 3 steps... but the run stopped before the epoch ended
    run_dir = fabricate_run(
        tmp_path / "short", "ensiam", 4, steps_per_epoch=3, epochs=1, log_every=1, speed=10, data_root=str(tiny_dataset)
    )
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in lines if r["step"] <= 2 and r.get("epoch", 0) == 0]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["batch_size"] = 16
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert runlog.read_run(run_dir).steps_per_epoch == 48 // 16
    config["data"]["root"] = str(tmp_path / "gone")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    run = runlog.read_run(run_dir)
    assert run.steps_per_epoch is None and run.epoch_of({"step": 2, "epoch": 0}) == 0.0


def test_plot_metrics_writes_an_image(two_runs, tmp_path, capsys):
    out = tmp_path / "plots" / "curves.png"
    assert plot_metrics.main([str(p) for p in two_runs] + ["--out", str(out), "--title", "test"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["steps_per_epoch"] == [7, 7]
    image = mpimg.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_results_table(two_runs, tmp_path, capsys):
    out = tmp_path / "table.md"
    assert results_table.main([str(p) for p in two_runs] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    table = out.read_text().strip().splitlines()
    assert printed[:-1] == table
    assert table[0].startswith("| run | dataset | method | K |") and len(table) == 4
    first = summary["rows"][0]
    assert first["method"] == "ensiam" and first["K"] == "4" and first["dataset"] == "cifar10"
    assert first["epochs"] == "3" and first["kNN top-1"] == "70.00" and first["linear top-1"] == "71.25"
    # median of images_per_s = 100 + (step % 3) over the logged steps
    steps = [r["step"] for r in runlog.read_run(two_runs[0]).train_records]
    assert first["images/s"] == f"{statistics.median(100 + s % 3 for s in steps):.0f}"
    second = summary["rows"][1]
    assert second["linear top-1"] == "-" and second["kNN top-1"] == "50.00" and second["epochs"] == "2"
    assert math.isclose(float(second["images/s"]), 301, abs_tol=1)


def test_bad_run_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert results_table.main([str(tmp_path / "empty")]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    run = fabricate_run(tmp_path / "broken", "ensiam", 4, steps_per_epoch=2, epochs=1, log_every=1, speed=1)
    with open(run / "metrics.jsonl", "a") as f:  # a damaged line before the last (a torn LAST line is skipped)
        f.write('{not json\n{"step": 99, "loss": 0.0}\n')
    assert plot_metrics.main([str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl:" in capsys.readouterr().err
