"""tools/preview_augmentations.py writes the grid picture it promises."""

from __future__ import annotations

import conftest
import pytest
from PIL import Image


def load_tool():
    return conftest.load_tool("preview_augmentations")


def has_dali_loader() -> bool:
    try:
        from ensiam_fast.data import dali_available
    except ImportError:
        return False
    return dali_available()


# DALI takes ~10 s to build a very_strong (RandAugment) graph: 'strong' keeps this test quick there.
@pytest.mark.parametrize("backend, preset", [("torch", "very_strong"), ("dali", "strong")])
def test_preview_writes_a_png_of_the_expected_size(tiny_dataset, tmp_path, backend, preset):
    if backend == "dali" and not has_dali_loader():
        pytest.skip("ensiam_fast.data (the DALI loader) or DALI itself is not available")
    tool = load_tool()
    out = tmp_path / "grid.png"
    result = tool.main(
        [
            "--data",
            str(tiny_dataset),
            "--preset",
            preset,
            "--views",
            "3",
            "--images",
            "2",
            "--out",
            str(out),
            "--cell",
            "40",
            "--backend",
            backend,
        ]
    )
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == tool.grid_size(2, 3, 40) == (4 + 4 * 44, 20 + 2 * 44 + 4)
        # the first row's original is the first image of the split (not a blank cell)
        cell = img.crop((4, 20, 44, 60)).convert("L")
        low, high = cell.getextrema()
        assert high > low
    assert (result["width"], result["height"]) == img.size


def test_preview_rejects_more_images_than_the_split_has(tiny_dataset, tmp_path, capsys):
    tool = load_tool()
    with pytest.raises(SystemExit) as exc:
        tool.main(["--data", str(tiny_dataset), "--split", "test", "--images", "30", "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2  # a user error: one line, as every command
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "only 24 images" in err, err
