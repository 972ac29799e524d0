import json
import shutil

import numpy as np
import pytest
import webdataset as wds

from ensiam_fast.shards import ShardFormatError, read_manifest, shard_paths


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


def test_write_shard_matches_tarfile_byte_for_byte(tmp_path):
    import io
    import tarfile

    from ensiam_fast.shards.format import write_shard
    from ensiam_fast.shards.verify import check_shard

    rng = np.random.default_rng(0)
    samples = [
        (f"k_{i:04d}", {"bin": rng.bytes(int(n)), "cls": str(i).encode()})
        for i, n in enumerate([0, 1, 511, 512, 513, 5000])
    ]
    rec = write_shard(tmp_path / "x-000000.tar", samples)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    assert (tmp_path / "x-000000.tar").read_bytes() == ref.getvalue()
    assert rec.num_samples == 6 and not list(tmp_path.glob("*.tmp"))
    # The index agrees with the tar member for member (images absent, so only the image check fails).
    problems = check_shard(tmp_path / "x-000000.tar", labeled=True, num_classes=10, decode=False).problems
    assert problems and all("should have one image" in p for p in problems)


@pytest.mark.parametrize(
    "key, value, kind",
    [
        ("labeled", "false", "true or false"),  # a string: Python would read it as true
        ("labeled", 0, "true or false"),
        ("num_samples", "48", "an integer >= 0"),
        ("num_samples", -1, "an integer >= 0"),
        ("num_samples", True, "an integer >= 0"),
        ("shards", "train-000000.tar", "a list of file names"),
        ("shard_sizes", [16, "16", 16], "a list of integers"),
    ],
)
def test_manifest_fields_of_the_wrong_type_are_named(tmp_path, tiny_dataset, key, value, kind):
    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"][key] = value
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError) as info:
        read_manifest(root)
    message = str(info.value)
    assert message.startswith(f"{root / 'manifest.json'}: split 'train' has a field of the wrong type: ")
    assert f"{key}={value!r} must be {kind}" in message


def test_an_unlabelled_split_marked_with_a_string_is_refused_by_the_trainer(tmp_path, tiny_dataset, capsys):
    """End to end: `"labeled": "false"` must not let the kNN monitor read labels that are not there."""
    from ensiam_fast import train

    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["test"]["labeled"] = "false"
    (root / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    assert train.main(["--config", "demo", f"data.root={root}", f"output_dir={out}", "data.image_size=16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "labeled='false' must be true or false" in err
    assert not out.exists()
