"""Draw a grid of augmented views: one row per image, the original first, then its K views.

    python tools/preview_augmentations.py --data shards/digits --preset very_strong --views 4 \
        --out views.png [--images 6 --split train --backend dali|torch --seed 0 --size 64 --cell 128]

The views come from the real loaders (``ensiam_fast.data.build_loader`` for DALI, the torchvision
reference for ``torch``): the chosen images are copied into a temporary one-shard dataset whose
``.cls`` is the row number, so each view finds its row whatever order the loader shuffles into.
Prints one JSON object (the output path and its pixel size) as its last line.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import common  # tools/common.py: the checkout first on sys.path
import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from ensiam_fast.data.torch import IMAGE_EXTS, build_reference_loader, decode_rgb  # noqa: E402
from ensiam_fast.errors import UserError  # noqa: E402
from ensiam_fast.rundir import check_target, write_bytes  # noqa: E402
from ensiam_fast.shards import Manifest, SplitInfo, read_manifest, shard_paths, write_manifest, write_shard  # noqa: E402
from pipelines.presets import check_jigsaw, check_views, get_preset  # noqa: E402

PAD = 4
TITLE_H = 20
BACKGROUND = (255, 255, 255)


def grid_size(images: int, views: int, cell: int) -> tuple[int, int]:
    """(width, height) in pixels of the picture for ``images`` rows of 1 + ``views`` cells."""
    return PAD + (views + 1) * (cell + PAD), TITLE_H + images * (cell + PAD) + PAD


def first_samples(root: Path, split: str, n: int) -> list[tuple[str, bytes]]:
    """The first ``n`` (extension, image bytes) of a split, in shard order."""
    tars, _ = shard_paths(root, split)
    out = []
    for sample in wds.tarfile_samples([{"url": t} for t in tars]):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise PreviewError(f"{sample.get('__url__')}: sample {sample.get('__key__')!r} has no .jpg/.png")
        out.append((ext, sample[ext]))
        if len(out) == n:
            break
    if len(out) < n:
        raise PreviewError(f"split {split!r} of {root} has only {len(out)} images; ask for --images {len(out)}")
    return out


def write_preview_dataset(tmp: Path, samples: list[tuple[str, bytes]], size: int) -> Path:
    """One shard whose label is the row number, so views can be matched to their original."""
    items = [(f"row_{i:04d}", {ext: data, "cls": str(i).encode()}) for i, (ext, data) in enumerate(samples)]
    rec = write_shard(tmp / "preview-000000.tar", items)
    info = SplitInfo(num_samples=len(items), shards=[rec.name], labeled=True, shard_sizes=[rec.num_samples])
    classes = [str(i) for i in range(len(items))]
    write_manifest(tmp, Manifest(dataset="preview", classes=classes, splits={"preview": info}, image_size=[size, size]))
    return tmp


def augmented_views(root: Path, n: int, views: int, preset, backend: str, seed: int) -> torch.Tensor:
    """(n, K, 3, S, S) uint8, row i holding the K views of image i."""
    kw = dict(batch_size=n, views=views, preset=preset, seed=seed, train=True, num_threads=1)
    if backend == "torch":
        loader = build_reference_loader(root, "preview", **kw)
    else:
        try:
            from ensiam_fast.data import build_loader
        except ImportError as e:
            raise PreviewError(f"--backend dali needs ensiam_fast.data ({e}); use --backend torch") from e
        loader = build_loader(root, "preview", backend="dali", device="cpu", **kw)
    x, y = next(iter(loader))
    out = torch.empty((n, *x.shape[0:1], *x.shape[2:]), dtype=torch.uint8)
    out[y.cpu()] = x.cpu().transpose(0, 1)
    return out


def to_cell(img: torch.Tensor, cell: int) -> Image.Image:
    """uint8 (3, H, W) -> a cell x cell PIL image, aspect kept, centred on the background."""
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    scale = cell / max(pil.size)
    # Nearest keeps the pixels of small (32x32) views visible as pixels.
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
    pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), resample)
    canvas = Image.new("RGB", (cell, cell), BACKGROUND)
    canvas.paste(pil, ((cell - pil.width) // 2, (cell - pil.height) // 2))
    return canvas


def draw_grid(originals: list[torch.Tensor], views: torch.Tensor, cell: int, title: str) -> Image.Image:
    n, k = views.shape[:2]
    sheet = Image.new("RGB", grid_size(n, k, cell), BACKGROUND)
    ImageDraw.Draw(sheet).text((PAD, 4), title, fill=(0, 0, 0))
    for i in range(n):
        top = TITLE_H + i * (cell + PAD)
        sheet.paste(to_cell(originals[i], cell), (PAD, top))
        for j in range(k):
            sheet.paste(to_cell(views[i, j], cell), (PAD + (j + 1) * (cell + PAD), top))
    return sheet


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="dataset directory (with manifest.json)")
    ap.add_argument("--preset", default="default", help="augmentation preset (default, strong, very_strong, linear)")
    ap.add_argument("--views", type=int, default=4, help="K views per image")
    ap.add_argument("--out", required=True, type=Path, help="PNG file to write")
    ap.add_argument("--images", type=int, default=6, help="rows: the first N images of the split")
    ap.add_argument("--split", default="train")
    ap.add_argument("--backend", choices=["dali", "torch"], default="torch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="view side (default: the manifest's image size)")
    ap.add_argument("--cell", type=int, default=128, help="pixels per picture in the grid")
    return ap.parse_args(argv)


class PreviewError(UserError):
    """A preview that cannot be drawn; the message says why and what to do."""


def main(argv=None) -> dict:
    """The command: ``error: ...`` and exit code 2 on a user error (as every ensiam_fast command)."""
    try:
        return preview(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def preview(args: argparse.Namespace) -> dict:
    # the rules' homes (pipelines/presets.py), as training applies them
    try:
        preset = get_preset(args.preset)
        check_views(args.views)
    except ValueError as e:
        raise PreviewError(f"--preset {args.preset} --views {args.views}: {e}") from None
    if args.images < 1 or args.cell < 1:
        raise PreviewError(f"--images {args.images} and --cell {args.cell} must be at least 1")
    check_target(args.out)  # a link or FIFO there: refused before the work, not after it
    size = args.size
    if size is None:
        manifest_size = read_manifest(args.data).image_size
        if not manifest_size:
            raise PreviewError(f"{args.data}: images differ in size (manifest image_size is null); pass --size")
        size = int(manifest_size[0])
    if size < 1:
        raise PreviewError(f"--size {size} must be at least 1")
    try:
        check_jigsaw(size, preset.jigsaw_grid)
    except ValueError as e:
        raise PreviewError(f"--size {size} with --preset {preset.name}: {e}") from None
    samples = first_samples(args.data, args.split, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_preview_dataset(Path(tmp), samples, size)
        views = augmented_views(root, args.images, args.views, preset, args.backend, args.seed)
    originals = [decode_rgb(data, f"{args.data} image {i}") for i, (_, data) in enumerate(samples)]
    title = f"preset {preset.name}  |  K={args.views}  |  {args.backend}  |  seed {args.seed}  |  {size}px"
    sheet = draw_grid(originals, views, args.cell, title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_bytes(args.out, buf.getvalue())  # the one writer (ensiam_fast/rundir.py)
    result = {
        "out": str(args.out),
        "width": sheet.width,
        "height": sheet.height,
        "preset": preset.name,
        "views": args.views,
        "images": args.images,
        "backend": args.backend,
        "mean_view_pixel": float(np.asarray(views, dtype=np.float64).mean()),
    }
    return common.print_result(result)


if __name__ == "__main__":
    main()
