import json

import numpy as np
import webdataset as wds

from ensiam_fast.shards import read_manifest, shard_paths


def test_tiny_dataset_round_trips_through_webdataset(tiny_dataset):
    m = read_manifest(tiny_dataset)
    assert m.num_classes == 12
    tars, idxs = shard_paths(tiny_dataset, "train")
    labels = []
    for sample in wds.WebDataset(tars, shardshuffle=False).decode("rgb8"):
        assert sample["jpg"].shape == (32, 32, 3)
        labels.append(int(sample["cls"]))
    assert labels == [i % 12 for i in range(48)]


def test_index_offsets_point_at_member_bytes(tiny_dataset):
    tars, idxs = shard_paths(tiny_dataset, "train")
    lines = open(idxs[0]).read().splitlines()
    version, count = lines[0].split()
    assert version == "v1.2" and int(count) == len(lines) - 1
    data = open(tars[0], "rb").read()
    ext, off, size, name = lines[1].split()[4:8]
    assert ext == "cls" and data[int(off) : int(off) + int(size)] == b"0"
    ext, off, size, name = lines[1].split()[0:4]
    assert data[int(off) : int(off) + 2] == b"\xff\xd8"  # JPEG start-of-image marker
    assert json.loads((tiny_dataset / "manifest.json").read_text())["num_classes"] == 12
    assert np.sum([int(c) for c in [count]]) == 16
