"""metrics.jsonl's one reader and its one rule for a damaged file; tools/common.py's shared helpers."""

from __future__ import annotations

import json

import common
import numpy as np
import pytest
import runlog
import yaml

from ensiam_fast.curves import write_curves
from ensiam_fast.metrics import MetricsError, MetricsLog, read_metrics

RECORDS = [{"step": 1, "loss": -0.1, "lr": 0.1}, {"step": 2, "loss": -0.2, "lr": 0.1}, {"step": 2, "knn_top1": 30.0}]


def write(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.mark.parametrize("tail", ["", "\n\n", '{"step": 3, "lo', '{"step": 3, "loss": -0.3\n'])
def test_a_torn_last_line_is_skipped(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    write(path, RECORDS, tail)
    assert read_metrics(path) == RECORDS


@pytest.mark.parametrize(
    ("bad", "needle"), [('{"step": 3, "lo', "metrics.jsonl:2 is not JSON"), ('{"loss": 1}', "metrics.jsonl:2 is not a")]
)
def test_a_bad_line_before_the_last_is_named(tmp_path, bad, needle):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + bad + "\n" + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(MetricsError, match=needle):
        read_metrics(path)


def test_every_reader_follows_the_one_rule(tmp_path):
    """The trainer's resume, curves.png and the tools' run reader agree on a torn file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "ensiam", "views": 2, "batch_size": 8}))
    write(run / "metrics.jsonl", RECORDS, '{"step": 3, "lo')
    assert runlog.read_run(run).records == RECORDS
    assert write_curves(run).is_file()
    MetricsLog(run / "metrics.jsonl", enabled=True, resume_step=2)  # cut back to what step 2 covers
    assert read_metrics(run / "metrics.jsonl") == RECORDS[:2]  # the torn line and the kNN line at 2 go
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(runlog.RunError, match="metrics.jsonl:2 is not JSON"):
        runlog.read_run(run)
    with pytest.raises(MetricsError, match="metrics.jsonl:2"):  # the trainer refuses to resume over it
        MetricsLog(run / "metrics.jsonl", enabled=True, resume_step=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('starting\n{"a": 1}\nsaved\n{"top1": 50.0}\n', {"top1": 50.0}),  # the last one wins
        ('{"a": 1}\n{"top1": 5', None),  # a result line cut short: no result, not an older one
        ("no json here\n", None),
        ("[1, 2]\n", None),
        ('{"a": 1}\n[1]\n', {"a": 1}),  # a line starting with [ is not a result line
    ],
)
def test_last_json(text, expected):
    assert common.last_json(text) == expected


def test_photo_like_images_are_smooth_colour_fields_with_noise():
    images = common.photo_like(np.random.default_rng(0), 3, 24, 40)
    assert images.shape == (3, 24, 40, 3) and images.dtype == np.uint8
    again = common.photo_like(np.random.default_rng(0), 3, 24, 40)
    assert np.array_equal(images, again)  # seeded
    x = images.astype(float)
    neighbour = np.abs(np.diff(x, axis=2)).mean()
    shuffled = np.abs(np.diff(np.random.default_rng(1).permutation(x.reshape(-1, 3)), axis=0)).mean()
    assert neighbour < 0.3 * shuffled  # neighbouring pixels agree far more than random pairs: not noise
    assert x.std(axis=(1, 2)).min() > 10  # not flat either
