"""tools/bench_resume.py in process: its split, and the checkpoint it writes the trainer's own way
(with and without the loader's state); the timed child runs are the tool's own business."""

from __future__ import annotations

import argparse

import conftest

from ensiam_fast.checkpoint import latest_checkpoint
from ensiam_fast.shards import read_manifest


def load_tool():
    return conftest.load_tool("bench_resume")


def test_checkpoint_mid_epoch_with_and_without_the_loader_state(tmp_path):
    tool = load_tool()
    root = tool.make_split(tmp_path / "data", 40, 16, per_shard=16)
    m = read_manifest(root)
    assert m.splits["train"].shard_sizes == [16, 16, 8] and m.image_size == [16, 16]
    assert tool.make_split(root, 999, 16) == root  # an existing split is reused, not rewritten
    args = argparse.Namespace(root=str(root), batch=8, views=2, size=16, threads=1, cpu_kernels="auto")
    out = tmp_path / "run"
    tool.write_checkpoint(args, out, 3)
    _, state = latest_checkpoint(out)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 3)
    assert state["loader"] is not None  # the DALI pipeline's position, what a resume restores
    assert state["config"]["max_steps"] == 4 and state["config"]["model"]["backbone"] == "test_resnet"
    tool.drop_loader_state(out)
    _, state = latest_checkpoint(out)
    assert state["loader"] is None and state["step"] == 3
