"""Hostile cases of the GPU graph's CUDA stages (issue 27's tester): each CUDA kernel equals its CPU
kernel bit for bit at sizes, thread counts and parameters the preset tests do not reach, ``launch``
refuses arguments a kernel would index out of bounds with, and the memory guard's message.

The CUDA kernels run under Numba's CUDA simulator in a child interpreter (``NUMBA_ENABLE_CUDASIM``
must be set before ``numba.cuda`` is imported, and must not leak into this process)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
import numpy as np
from pipelines.kernels import cuda as C, frames as F
from pipelines.kernels.randaugment import MAX_TRANSLATE_REL, RA_PARAMS_PER_OP, ra_op_params
from pipelines.presets import VERY_STRONG

rng = np.random.default_rng(27)
result = {"mismatch": [], "errors": {}, "cases": 0}


def ra(op, sign, mag, bins, h, w):
    p = np.zeros(RA_PARAMS_PER_OP, np.float32)
    ra_op_params(p, op, sign, np.float64(mag), np.float64(bins), np.float64(MAX_TRANSLATE_REL), h, w)
    return p


def same(tag, name, img, params, threads):
    cpu = np.full_like(img, 77)
    F.APPLY[name](cpu, img, params)
    gpu = np.full_like(img, 99)
    scratch = np.full_like(img, 55) if C.OUTPUTS[name] == 2 else None
    C.launch(name, gpu, img, params, scratch=scratch, threads=threads)
    if not np.array_equal(cpu, gpu):
        result["mismatch"].append(tag)
    result["cases"] += 1


def ra_jig(ops, jig=None, grid=0):  # one view's randaugment_jigsaw parameters: header, operations, jigsaw
    rows = [np.float32([len(ops), grid])] + list(ops) + ([np.float32(jig)] if grid else [])
    return np.concatenate(rows).astype(np.float32)


RJ = F.RA_JIGSAW
# the per-channel reductions (autocontrast range, equalisation table) with fewer threads than channels
img = rng.integers(0, 256, (2, 6, 4, 3), dtype=np.uint8)
chain = [ra(12, 1.0, 5, 31, 6, 4), ra(13, 1.0, 5, 31, 6, 4), ra(8, -1.0, 30, 31, 6, 4)]
tiles = [1.0, 3, 0, 2, 1]  # a 2x2 jigsaw after the operations: apply, then the source tiles
for threads in (1, 2, 3, 256):
    same(f"autocontrast+equalize+contrast threads={threads}", RJ, img, np.stack([ra_jig(chain)] * 2), threads)
    same(f"autocontrast+equalize+contrast+jigsaw threads={threads}", RJ, img,
         np.stack([ra_jig(chain, tiles, 2)] * 2), threads)  # fmt: skip
# no operation, and a jigsaw not drawn: a copy, as the CPU kernel
same("no operation", RJ, img, np.zeros((2, 2), np.float32), 8)
same("jigsaw not drawn", RJ, img, np.stack([ra_jig([], [0.0, 0, 1, 2, 3], 2)] * 2), 8)
same("one operation, jigsaw not drawn", RJ, img, np.stack([ra_jig(chain[:1], [0.0, 0, 1, 2, 3], 2)] * 2), 8)
# colour at the ends of its ranges, on a 1x1 and a 7x5 frame, the contrast on a constant frame
for h, w in ((1, 1), (7, 5)):
    frame = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    for case in ([1, 3, 0.5], [1, 3, -0.5], [1, 2, 0.0], [1, 0, 0.0], [5, 0, 1.3, 1, 0.6, 2, 1.7, 3, -0.3, 4, 0]):
        p = np.zeros((2, 11), np.float32)
        p[:, : len(case)] = case
        same(f"colour {case} {h}x{w}", "colour", frame, p, 16)
flat = np.full((2, 3, 3, 3), 77, np.uint8)
same("colour contrast constant", "colour", flat, np.float32([[1, 1, 1.9] + [0] * 8] * 2), 16)
same("randaugment contrast constant", RJ, flat, np.stack([ra_jig([ra(8, 1.0, 30, 31, 3, 3)])] * 2), 16)
# every RandAugment operation at its top magnitude, both signs: alone on a 1x6 frame; then on a
# 4x6 frame followed by a 2x2 jigsaw (three steps with Sharpness: the output after the scratch)
frame = rng.integers(0, 256, (2, 1, 6, 3), dtype=np.uint8)
wide = rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
for op in range(14):
    both = np.stack([ra_jig([ra(op, 1.0, 30, 31, 1, 6)]), ra_jig([ra(op, -1.0, 30, 31, 1, 6)])])
    same(f"randaugment op {op} 1x6", RJ, frame, both, 16)
    for extra in ([], [ra(9, 1.0, 30, 31, 4, 6)]):
        both = np.stack([ra_jig([ra(op, s, 30, 31, 4, 6)] + extra, [1.0, 2, 0, 3, 1], 2) for s in (1.0, -1.0)])
        same(f"randaugment op {op} + {len(extra)} + jigsaw 4x6", RJ, wide, both, 16)
# jigsaw alone, one view, local mode; and after two operations drawn by the preset's own kernel
frame = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
jig_only = VERY_STRONG.replace(jigsaw_mode="local", randaugment_n=0)
p = F.params(RJ, jig_only, 8, rng.random((1, 33)).astype(np.float32))
same("jigsaw local K=1", RJ, frame, p, 16)
frames = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
p = F.params(RJ, VERY_STRONG, 8, rng.random((6, F.plan(RJ, VERY_STRONG, 8)[0])).astype(np.float32))
same("very_strong K=6", RJ, frames, p, 32)
result["very_strong_columns"] = int(p.shape[1])

# arguments launch must refuse (a CUDA kernel checks no index)
u8 = np.zeros((2, 4, 4, 3), np.uint8)
colour_p = np.zeros((2, 11), np.float32)
alias = u8.copy()
bad = {
    "float img": ("colour", np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 4, 4, 3), np.float32), colour_p, None, 8),
    "small out": ("colour", np.zeros((2, 2, 2, 3), np.uint8), u8, colour_p, None, 8),
    "float64 params": ("colour", u8.copy(), u8, colour_p.astype(np.float64), None, 8),
    "params of fewer views": ("colour", u8.copy(), u8, colour_p[:1], None, 8),
    "4 channels": ("colour", np.zeros((2, 4, 4, 4), np.uint8), np.zeros((2, 4, 4, 4), np.uint8), colour_p, None, 8),
    "colour columns": ("colour", u8.copy(), u8, np.zeros((2, 5), np.float32), None, 8),
    "header columns": (RJ, u8.copy(), u8, np.float32([[1, 0, 0]] * 2), u8.copy(), 8),
    "no header": (RJ, u8.copy(), u8, np.zeros((2, 1), np.float32), u8.copy(), 8),
    "nan header": (RJ, u8.copy(), u8, np.float32([[np.nan, 0]] * 2), u8.copy(), 8),
    "no scratch": (RJ, u8.copy(), u8, np.float32([[1, 0] + [0] * 7] * 2), None, 8),
    "jigsaw grid not dividing": (RJ, np.zeros((2, 9, 9, 3), np.uint8), np.zeros((2, 9, 9, 3), np.uint8),
                                 np.float32([[0, 4, 1] + list(range(16))] * 2), np.zeros((2, 9, 9, 3), np.uint8), 8),
    "blur radius past its taps": ("blur", u8.copy(), u8, np.float32([[1, 2, 0.5, 0.25, 0.0], [1, 3, 0.5, 0.2, 0.05]]),
                                  None, 8),
    "unknown operation": (RJ, u8.copy(), u8, np.float32([[1, 0, 14] + [0] * 6] * 2), u8.copy(), 8),
    "tiles out of range": (RJ, u8.copy(), u8, np.float32([[0, 2, 1, 0, 1, 2, 9]] * 2), u8.copy(), 8),
    "no threads": ("colour", u8.copy(), u8, colour_p, None, 0),
    "unknown stage": ("crop", u8.copy(), u8, colour_p, None, 8),
    # aliased buffers: the kernels read other pixels of their source than the one they write
    "out is img": ("colour", u8, u8, colour_p, None, 8),
    "scratch is out": (RJ, alias, u8, np.float32([[0, 2, 1, 0, 1, 2, 3]] * 2), alias, 8),
    "scratch is img": (RJ, u8.copy(), u8, np.float32([[0, 2, 1, 0, 1, 2, 3]] * 2), u8, 8),
    "nan operation": (RJ, u8.copy(), u8, np.float32([[1, 0, np.nan] + [0] * 6] * 2), u8.copy(), 8),
    "inf tile": (RJ, u8.copy(), u8, np.float32([[0, 2, 1, np.inf, 1, 2, 3]] * 2), u8.copy(), 8),
    "fractional threads": ("colour", u8.copy(), u8, colour_p, None, 1.5),
    "bool threads": ("colour", u8.copy(), u8, colour_p, None, True),
    "strided img": ("colour", u8.copy(), np.zeros((2, 8, 4, 3), np.uint8)[:, ::2], colour_p, None, 8),
}  # fmt: skip
# no views: nothing to launch (a grid of 0 blocks is an invalid launch on a device; the simulator runs it)
compiled = C.kernel
C.kernel = lambda name: (_ for _ in ()).throw(AssertionError(f"{name} launched with no views"))
try:
    none = np.zeros((0, 4, 4, 3), np.uint8)
    C.launch(RJ, none.copy(), none, np.zeros((0, 2), np.float32), scratch=none.copy())
    result["no views"] = "not launched"
except AssertionError as e:
    result["no views"] = str(e)
C.kernel = compiled
for tag, (name, out, im, params, scratch, threads) in bad.items():
    try:
        C.launch(name, out, im, params, scratch=scratch, threads=threads)
        result["errors"][tag] = "no error"
    except Exception as e:
        result["errors"][tag] = f"{type(e).__name__}: {e}"
print(json.dumps(result))
"""


@pytest.mark.slow
def test_cuda_stages_hostile_cases_under_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mismatch"] == [], result["mismatch"]
    errors = result["errors"]
    assert result["cases"] == 4 * 2 + 3 + 11 + 1 + 14 * 3 + 2
    assert result["very_strong_columns"] == 2 + 2 * 7 + 1 + 16
    assert len(errors) == 24
    assert result["no views"] == "not launched"
    for tag, pair in (
        ("out is img", "out and img"),
        ("scratch is out", "scratch and out"),
        ("scratch is img", "scratch and img"),
    ):
        assert f"{pair} must not share memory" in errors[tag], (tag, errors[tag])
    assert "RandAugment operations must be 0..13, got [nan]" in errors["nan operation"]
    assert "jigsaw tiles must be finite" in errors["inf tile"]
    assert "threads per block must be in 1..1024, got 1.5 (an int)" in errors["fractional threads"]
    assert "got True" in errors["bool threads"]
    assert "img must be contiguous" in errors["strided img"]
    for tag, message in errors.items():
        assert message.startswith("ValueError: "), (tag, message)
        assert "\n" not in message, (tag, message)
    assert "img must be (K, H, W, 3) uint8" in errors["float img"]
    assert "out must be uint8 shaped like img (2, 4, 4, 3), got (2, 2, 2, 3)" in errors["small out"]
    assert "params must be (2, P) float32" in errors["float64 params"]
    assert "params must be (2, P) float32, got (1, 11)" in errors["params of fewer views"]
    assert "must have 11 columns" in errors["colour columns"]
    assert "view 0's header (n_ops=1, grid=0) needs 9 columns" in errors["header columns"]
    assert errors["header columns"].endswith("got 3")
    assert "must start with (n_ops, grid), got 1 columns" in errors["no header"]
    assert "header (n_ops, grid) must be finite" in errors["nan header"]
    assert "needs a scratch array" in errors["no scratch"]
    assert "jigsaw grid 4 must divide the frame 9x9" in errors["jigsaw grid not dividing"]
    assert "view 0's jigsaw tiles must be a permutation of 0..3" in errors["tiles out of range"]
    assert "view 0's RandAugment operations must be 0..13, got [14.]" in errors["unknown operation"]
    assert "blur: view 1's radius 3 must be a whole number in 0..2" in errors["blur radius past its taps"]
    assert "threads per block must be in 1..1024, got 0" in errors["no threads"]
    assert "no CUDA kernel for stage 'crop'" in errors["unknown stage"]


@pytest.mark.parametrize(
    ("preset", "size", "images", "limit"),
    [
        ("very_strong", 32, 64, 0.001),
        ("default", 224, 64, 0.45),
        ("default", 32, 8, 0.0001),
        ("very_strong", 224, 4096, 6.0),
    ],
)
def test_gpu_memory_message_shows_a_need_above_the_limit(preset, size, images, limit):
    """The refusal's need, as printed, exceeds the limit it is refused against (it printed
    '0.0 GB ... more than data.gpu_memory_gb=0.001')."""
    from pipelines.presets import check_gpu_memory, get_preset

    with pytest.raises(ValueError) as info:
        check_gpu_memory(get_preset(preset), size, images, 4, limit)
    shown = float(re.search(r"projects (\S+) GB", str(info.value)).group(1))
    assert shown > limit, str(info.value)
    assert f"data.preset={preset!r}" in str(info.value) and f"batch of {images} images" in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"blur_sigma": (2.0, 0.5)}, "blur_sigma must be (lo, hi) with 0 < lo <= hi"),
        ({"blur_sigma": (0.0, 2.0)}, "blur_sigma must be (lo, hi) with 0 < lo <= hi"),
        ({"blur_sigma": (1.0,)}, "blur_sigma must be (lo, hi) with 0 < lo <= hi"),
        ({"hue": 0.7}, "hue must be in [0, 0.5]"),
        ({"hue": -0.1}, "hue must be in [0, 0.5]"),
        ({"brightness": -1.0}, "brightness must be >= 0"),
        ({"saturation": float("nan")}, "saturation must be >= 0"),
    ],
)
def test_preset_refuses_ranges_the_kernels_cannot_apply(override, message):
    """A reversed blur_sigma sized a view's taps from its smaller end and the blur kernels wrote past
    them (IndexError under NUMBA_BOUNDSCHECK=1, memory corruption without); sigma 0 divides by
    zero; hue beyond 0.5 and negative jitter are refused by torchvision's ColorJitter."""
    from pipelines.presets import get_preset

    with pytest.raises(ValueError, match=re.escape(message)):
        get_preset("default", **override)
    assert get_preset("default", blur_p=0.0, blur_sigma=(0.0, 0.0)).blur_p == 0.0  # no blur: not checked


@pytest.mark.slow
def test_train_refuses_reversed_blur_sigma_before_writing(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    overrides = ["data.preset_overrides={blur_sigma: [2.0, 0.5]}", f"output_dir={run}", "epochs=1", "max_steps=1"]
    cmd = [sys.executable, "-m", "ensiam_fast.train", "--config", "demo", f"data.root={tiny_dataset}", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: data.preset_overrides: blur_sigma must be"), proc.stderr[-2000:]
    assert not run.exists()
