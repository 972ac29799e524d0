"""tools/bench_pipeline.py: its data, one measured configuration and the target check, on a tiny run."""

from __future__ import annotations

import conftest

from ensiam_fast.shards import read_manifest


def load_tool():
    return conftest.load_tool("bench_pipeline")


def test_bench_data_has_the_promised_sizes(tmp_path):
    tool = load_tool()
    small = read_manifest(tool.write_bench_dataset(tmp_path / "s32", 32, 20, shard_size=8))
    assert small.image_size == [32, 32] and small.splits["train"].shard_sizes == [8, 8, 4]
    big = read_manifest(tool.write_bench_dataset(tmp_path / "s224", 224, 3))
    assert big.image_size is None  # 500x375 sources: views come from --size / image_size


def test_bench_config_measures_the_reference_and_checks_targets(tmp_path):
    tool = load_tool()
    roots = {32: tool.write_bench_dataset(tmp_path / "s32", 32, 32)}
    row = tool.bench_config(
        roots, ["torch"], size=32, preset="default", views=2, batch=8, threads=0, device="cpu", repeats=2
    )
    assert len(row["torch_images_s_all"]) == 2 and min(row["torch_images_s_all"]) > 0
    # the reported rate is the median of the timed epochs (two: their mean), views = K x images
    assert abs(row["torch_images_s"] - sum(row["torch_images_s_all"]) / 2) <= 0.1
    assert abs(row["torch_views_s"] - 2 * row["torch_images_s"]) <= 0.2
    met = tool.check_targets([dict(size=32, preset="default", views=4, ratio_dali_over_torch=6.5)], "cpu")
    missed = tool.check_targets([dict(size=224, preset="default", views=4, ratio_dali_over_torch=1.5)], "cpu")
    assert met["cpu_ratio_32"]["met"] and not missed["cpu_ratio_224"]["met"]


def test_bench_config_arithmetic_on_a_known_clock(monkeypatch):
    """With time_epoch replaced by known timings: the warm-up epoch is dropped, each rate is the
    median over the timed epochs (with and without set_epoch), the backends alternate their order
    each repeat, and the ratio is DALI's rate over torch's."""
    tool = load_tool()
    timings = {  # per backend, per epoch: (set_epoch seconds, epoch seconds, images)
        "dali": [(9.0, 100.0, 1), (0.5, 2.0, 32), (0.5, 4.0, 32), (0.5, 1.0, 32)],
        "torch": [(9.0, 100.0, 1), (0.0, 8.0, 32), (0.0, 4.0, 32), (0.0, 16.0, 32)],
    }
    calls = []
    monkeypatch.setattr(tool, "build", lambda b, root, **kw: b)
    monkeypatch.setattr(
        tool, "time_epoch", lambda loader, epoch: calls.append((loader, epoch)) or timings[loader][epoch]
    )
    row = tool.bench_config({32: "root"}, ["dali", "torch"], size=32, preset="default", views=4, batch=8, threads=0,
                            device="cpu", repeats=3)  # fmt: skip
    assert calls == [("dali", 0), ("torch", 0), ("torch", 1), ("dali", 1), ("dali", 2), ("torch", 2),
                     ("torch", 3), ("dali", 3)]  # fmt: skip
    assert row["dali_images_s_all"] == [16.0, 8.0, 32.0] and row["dali_images_s"] == 16.0
    assert row["dali_views_s"] == 64.0 and row["dali_set_epoch_s"] == 0.5
    assert row["dali_images_s_incl_set_epoch"] == 12.8  # median of 32/2.5, 32/4.5, 32/1.5
    assert row["torch_images_s"] == 4.0 and row["torch_images_s_incl_set_epoch"] == 4.0
    assert row["ratio_dali_over_torch"] == 4.0 and row["ratio_incl_set_epoch"] == 3.2
