"""Probe of issue 26 (one home per rule): the same bad value refused with the same rule by every
command that meets it. Fast tests call the homes in-process; slow ones run the real commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ensiam_fast.config import load_config
from ensiam_fast.errors import ConfigError, UserError
from ensiam_fast.evaluate.linear import LinearSettings
from pipelines.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]

BAD_PRESET_FIELDS = [
    ("crop_scale", (0.9, 0.1)),
    ("crop_scale", (0.0, 1.0)),
    ("crop_ratio", (0.0, 0.0)),
    ("jigsaw_grid", -2),
    ("randaugment_n", -1),
    ("resize_ratio", 0.0),
]


@pytest.mark.parametrize("field,value", BAD_PRESET_FIELDS)
def test_preset_field_out_of_range_is_refused_by_the_preset(field, value):
    with pytest.raises(ValueError, match=field):
        get_preset("default", **{field: value})


@pytest.mark.parametrize("field,value", BAD_PRESET_FIELDS)
def test_preset_override_out_of_range_is_a_config_error(field, value):
    override = f"data.preset_overrides={{{field}: {list(value) if isinstance(value, tuple) else value}}}"
    with pytest.raises(ConfigError, match=f"data.preset_overrides: {field}"):
        load_config("demo", [override])


def test_in_range_preset_fields_still_accepted():
    get_preset("eval", resize_ratio=256 / 224)
    get_preset("linear", crop_scale=(0.08, 1.0))
    get_preset("very_strong", jigsaw_grid=0, randaugment_n=0)


@pytest.mark.parametrize(
    "given",
    [{"lr": float("inf")}, {"base_lr": float("nan")}, {"momentum": 1.5}, {"weight_decay": float("inf")}],
)
def test_linear_settings_use_the_trainers_bounds(given):
    with pytest.raises(UserError):
        LinearSettings(**given).check()
    LinearSettings().check()  # the defaults pass


def run(args, timeout=300):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_train_refuses_a_reversed_crop_scale_before_writing(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    proc = run(
        ["-m", "ensiam_fast.train", "--config", "demo", f"data.root={tiny_dataset}", f"output_dir={out}",
         "max_steps=1", "knn_every=0", "data.preset_overrides={crop_scale: [0.9, 0.1]}"]
    )  # fmt: skip
    assert_one_line_error(proc, "crop_scale", "[0.9, 0.1]")
    assert "shards" not in proc.stderr  # the preset's fault, not the data's
    assert not out.exists()


EVALUATE_REFUSALS = [
    (["knn", "--k", "0"], "knn_k"),
    (["knn", "--t", "0"], "knn_t"),
    (["knn", "--t", "nan"], "knn_t"),
    (["knn", "--image-size", "0"], "data.image_size"),
    (["knn", "--eval-batch-size", "0"], "eval_batch_size"),
    (["linear", "--lr", "inf", "--precomputed"], "lr=inf"),
    (["linear", "--momentum", "1.5", "--precomputed"], "momentum=1.5"),
]


@pytest.mark.parametrize("args,needle", EVALUATE_REFUSALS)
def test_evaluate_refuses_what_training_refuses(tiny_run, tmp_path, args, needle, capsys):
    """The command's main in process, on the session's trained run (tests/conftest.py); the child
    interpreter form, once, is the slow test below."""
    from ensiam_fast.evaluate import main as evaluate_main

    out = tmp_path / "result.json"
    assert evaluate_main([*args, "--run", str(tiny_run), "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert needle in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.slow  # a child interpreter: the real command, for one of the refusals above
def test_evaluate_refuses_through_the_command(tiny_run, tmp_path):
    out = tmp_path / "result.json"
    proc = run(["-m", "ensiam_fast.evaluate", "knn", "--t", "nan", "--run", str(tiny_run), "--quiet", "--out",
                str(out)])  # fmt: skip
    assert_one_line_error(proc, "knn_t")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--views", "0"], "views (K) must be an integer in 1..16, got 0"),
        (["--views", "99"], "views (K) must be an integer in 1..16, got 99"),
        (["--preset", "nope"], "unknown augmentation preset 'nope'"),
        (["--preset", "very_strong", "--size", "30"], "not divisible by the jigsaw grid 4"),
    ],
)
def test_preview_applies_the_presets_rules(tiny_dataset, tmp_path, args, needle):
    out = tmp_path / "views.png"
    proc = run(["tools/preview_augmentations.py", "--data", str(tiny_dataset), "--out", str(out), *args])
    assert_one_line_error(proc, needle)
    assert not out.exists()


@pytest.mark.slow
def test_preview_refuses_to_write_through_a_link(tiny_dataset, tmp_path):
    target, link = tmp_path / "elsewhere.png", tmp_path / "views.png"
    link.symlink_to(target)
    proc = run(["tools/preview_augmentations.py", "--data", str(tiny_dataset), "--out", str(link),
                "--views", "2", "--images", "1"])  # fmt: skip
    assert_one_line_error(proc, str(link), "symbolic link")
    assert not target.exists()


@pytest.mark.slow
def test_bench_resume_offers_the_trainers_cpu_kernels(tmp_path):
    proc = run(["tools/bench_resume.py", "--cpu-kernels", "dali", "--work", str(tmp_path)])
    assert proc.returncode == 2 and "invalid choice: 'dali'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())
    from pipelines.presets import CPU_KERNELS

    assert all(f"'{c}'" in proc.stderr for c in CPU_KERNELS)


LABELS = [
    b"7",
    b" 7 ",
    b"0007",
    b"7\n",
    b"\x007",
    b"12",
    b"1 2",
    b"1\t2",
    b"1\x002",
    b"-1",
    b"1e3",
    b"+7",
    b" ",
    b"9" * 30,
]


@pytest.mark.parametrize("label", LABELS, ids=repr)
def test_batch_label_parser_agrees_with_parse_label(label):
    """The DALI loader's per-batch parser (parse_labels) accepts what parse_label accepts, and no more."""
    import numpy as np

    from ensiam_fast.shards.format import ShardFormatError, parse_label, parse_labels

    raw = np.zeros((2, 32), dtype=np.uint8)
    raw[0, : len(label)] = list(label)
    raw[1, 0] = ord("3")
    try:
        expected = parse_label(label)
    except ValueError:
        with pytest.raises(ShardFormatError):
            parse_labels(raw)
    else:
        assert parse_labels(raw).tolist() == [expected, 3]


def relabel_first_sample(root: Path, label: bytes) -> None:
    """Rewrite train's first shard with the first sample's .cls replaced, and record the new tar and index
    as checked (a manifest edited by hand to trust them), so only the loader's own parse sees the label."""
    import json
    import os

    import webdataset as wds

    from ensiam_fast.shards.format import write_shard

    tar = root / "train-000000.tar"
    samples = []
    for i, s in enumerate(wds.tarfile_samples([{"url": str(tar)}])):
        parts = {k: v for k, v in s.items() if not k.startswith("__")}
        samples.append((s["__key__"], {**parts, "cls": label} if i == 0 else parts))
    tar.unlink()
    write_shard(tar, samples)
    manifest = json.loads((root / "manifest.json").read_text())
    check = manifest["splits"]["train"]["check"]
    for section in ("tars", "indices"):
        for name in check[section]:
            st = os.stat(root / name)
            check[section][name] = [st.st_size, st.st_mtime_ns]
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_torch_backend_refuses_a_blank_inside_a_label(tmp_path):
    from conftest import make_tiny_dataset

    root = make_tiny_dataset(tmp_path / "data", {"train": (32, True), "test": (16, True)})
    relabel_first_sample(root, b"0 1")
    proc = run(
        ["-m", "ensiam_fast.train", "--config", "demo", f"data.root={root}", f"output_dir={tmp_path / 'run'}",
         "epochs=1", "batch_size=16", "knn_every=0", "data.backend=torch"]
    )  # fmt: skip
    assert_one_line_error(proc, "'0 1'", "not an ASCII decimal class index")


@pytest.mark.slow
def test_dali_loader_names_the_split_of_a_bad_label_in_a_trusted_tar(tmp_path):
    """The DALI backend reads the labels of a trusted tar only in its per-batch parse: it refuses '0 1'
    (it read it as 1 before), naming the split, and exits 2 (not SIGABRT from the epoch built ahead)."""
    from conftest import make_tiny_dataset

    root = make_tiny_dataset(tmp_path / "data", {"train": (32, True), "test": (16, True)})
    relabel_first_sample(root, b"0 1")
    proc = run(
        ["-m", "ensiam_fast.train", "--config", "demo", f"data.root={root}", f"output_dir={tmp_path / 'run'}",
         "epochs=1", "batch_size=16", "knn_every=0", "data.backend=dali"]
    )  # fmt: skip
    assert_one_line_error(proc, "'0 1'", "split 'train'")
    assert "terminate called" not in proc.stderr


@pytest.mark.slow
def test_dali_preview_exits_cleanly(tiny_dataset, tmp_path):
    """An exit right after the first DALI batch (the next epoch's pipeline still being built ahead) was
    SIGABRT, 'terminate called without an active exception', on every run."""
    out = tmp_path / "views.png"
    proc = run(["tools/preview_augmentations.py", "--data", str(tiny_dataset), "--out", str(out),
                "--views", "2", "--images", "1", "--backend", "dali"])  # fmt: skip
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    assert out.is_file()


@pytest.mark.parametrize("method,views", [("ensiam", 1), ("ensiam", 18), ("simsiam", 4), ("simsiam_kaug", 3)])
def test_losses_and_config_refuse_k_with_the_same_line(method, views):
    """losses.get_loss (every tool that builds a loss) and the config give the same rule and words."""
    from ensiam_fast.config_checks import check_method_views
    from ensiam_fast.losses import get_loss

    with pytest.raises(ConfigError) as from_config:
        load_config("demo", [f"method={method}", f"views={views}"])
    with pytest.raises(ValueError) as from_loss:
        get_loss(method, views)
    with pytest.raises(ConfigError) as from_home:
        check_method_views(method, views)
    assert str(from_config.value) == str(from_loss.value) == str(from_home.value)


@pytest.mark.slow
def test_grad_variance_unknown_preset_is_one_line(tiny_dataset, tmp_path):
    args = ["--config", "demo", "--data", str(tiny_dataset), "--views", "2", "--draws", "3", "--batch-size", "8"]
    proc = run(["tools/grad_variance.py", *args, "--preset", "nope", "--quiet", "--plot", str(tmp_path / "g.png")])
    assert_one_line_error(proc, "--preset nope", "unknown augmentation preset 'nope'")


def edit_manifest(root: Path, **changes) -> None:
    import json

    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("size", [[0, 0], [32, 0], [-32, -32]])
def test_manifest_image_size_must_be_positive(tmp_path, size):
    from conftest import make_tiny_dataset

    from ensiam_fast.shards import ShardFormatError, read_manifest

    root = make_tiny_dataset(tmp_path / "data", {"train": (16, True)})
    edit_manifest(root, image_size=size)
    with pytest.raises(ShardFormatError, match=r"image_size=.* must be \[height, width\] \(integers >= 1\)"):
        read_manifest(root)


@pytest.mark.slow
def test_train_and_preview_refuse_a_zero_manifest_image_size_alike(tmp_path):
    from conftest import make_tiny_dataset

    root = make_tiny_dataset(tmp_path / "data", {"train": (32, True), "test": (16, True)})
    edit_manifest(root, image_size=[0, 0])
    needle = "image_size=[0, 0] must be [height, width] (integers >= 1) or null"
    train = run(["-m", "ensiam_fast.train", "--config", "demo", f"data.root={root}", f"output_dir={tmp_path / 'run'}",
                 "max_steps=1", "knn_every=0", "batch_size=16"])  # fmt: skip
    assert_one_line_error(train, needle)
    preview = run(["tools/preview_augmentations.py", "--data", str(root), "--out", str(tmp_path / "v.png")])
    assert_one_line_error(preview, needle)


@pytest.mark.slow
@pytest.mark.parametrize(
    "grid,needle",
    [
        ("config: demo\nconfig: demo\n", "key 'config' is given twice (lines 1 and 2)"),
        ("config: demo\nlinear: {epochs: 0}\n", "linear: epochs=0"),
        ("config: demo\nlinear: {momentum: 1.5}\n", "momentum=1.5 in [0, 1)"),
        ("config: demo\nlinear: {crop_scale: [0.9, 0.1]}\n", "crop_scale=0.9,0.1"),
    ],
)
def test_compare_grid_file_is_checked_by_the_homes_before_any_run(tiny_dataset, tmp_path, grid, needle):
    path = tmp_path / "grid.yaml"
    path.write_text(
        grid + f"set: [data.root={tiny_dataset}, max_steps=1, batch_size=16]\n"
        "blocks:\n  - {methods: [ensiam], views: [4], seeds: [0]}\n"
    )
    out = tmp_path / "out"
    proc = run(["tools/compare.py", "--grid", str(path), "--out", str(out)])
    assert_one_line_error(proc, needle)
    assert not out.exists()  # refused before the first run trained


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--views", "0"], "views (K) must be an integer in 1..16, got 0"),
        (["--presets", "nope"], "unknown augmentation preset 'nope'"),
        (["--sizes", "64"], "--sizes must be taken from [32, 224]"),
    ],
)
def test_bench_pipeline_refuses_bad_flags_before_any_work(args, needle):
    proc = run(["tools/bench_pipeline.py", "--device", "cpu", *args])
    assert_one_line_error(proc, needle)
    assert "results" not in proc.stdout  # no JSON with per-row 'error' fields and exit 0
