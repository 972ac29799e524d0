"""tools/bench_pipeline.py: its data, one measured configuration and the target check, on a tiny run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ensiam_fast.shards import read_manifest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_pipeline.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_pipeline", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
    assert row["torch_images_s"] > 0 and abs(row["torch_views_s"] - 2 * row["torch_images_s"]) <= 0.2
    assert len(row["torch_images_s_all"]) == 2
    met = tool.check_targets([dict(size=32, preset="default", views=4, ratio_dali_over_torch=6.5)], "cpu")
    missed = tool.check_targets([dict(size=224, preset="default", views=4, ratio_dali_over_torch=1.5)], "cpu")
    assert met["cpu_ratio_32"]["met"] and not missed["cpu_ratio_224"]["met"]
