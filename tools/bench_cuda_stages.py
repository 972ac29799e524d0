"""The CUDA stages of the GPU graph against the CPU kernels: bit for bit, and their time.

    python tools/bench_cuda_stages.py                             # on a GPU (torch + Numba, no DALI needed)
    python tools/bench_cuda_stages.py --simulate --size 20 --threads 16 --repeats 0   # a CPU-only machine

Each stage (colour, blur, RandAugment + jigsaw) runs on a set of views chosen to cover every
operation the presets use (each jitter operation at factors below and above 1, hue both ways, grey,
a five-operation sequence; blur at several sigmas and off; each of the 14 RandAugment operations
with both signs and no jigsaw, random pairs of them followed by a jigsaw global, local or off, and
the jigsaw alone), the views of one parameter layout as frames of one launch
(``pipelines.kernels.cuda.launch``), and is compared value for value with the CPU kernel
(``pipelines.kernels.frames``) on the same parameters. Under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, NumPy arrays) the same check runs on a CPU-only machine
(``tests/test_cuda_kernels.py``). With ``--repeats`` > 0 (a GPU only) each stage is also timed on
``--views`` frames of ``--size``: milliseconds per launch on the GPU (CUDA events) against the CPU
kernel on one core. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if "--simulate" in sys.argv[1:]:  # before Numba is imported: it reads the switch once
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import common  # noqa: E402, F401  (tools/common.py: the checkout first on sys.path)

ROOT = Path(__file__).resolve().parents[1]

from pipelines.kernels import frames as F  # noqa: E402
from pipelines.kernels.randaugment import RA_OPS, RA_PARAMS_PER_OP, ra_op_params  # noqa: E402
from pipelines.presets import get_preset  # noqa: E402

STAGES = ("colour", "blur", F.RA_JIGSAW)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: smooth colour fields plus noise (every hue, edges, a histogram)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        phase = rng.uniform(0, 6.28, 3)
        base = 128 + 110 * np.sin(4 * xx[..., None] + 3 * yy[..., None] + phase)
        out.append(np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255))
    return np.uint8(out)


def colour_cases() -> np.ndarray:
    rows = []
    for op, factors in ((0, (0.6, 1.4)), (1, (0.6, 1.4)), (2, (0.2, 1.8)), (3, (-0.1, 0.1, -0.45, 0.3))):
        for f in factors:
            rows.append([1, op, f] + [0] * 8)
    rows.append([1, 4, 0] + [0] * 8)  # grey
    rows.append([5, 3, 0.07, 1, 1.3, 2, 0.5, 0, 0.8, 4, 0])  # hue, contrast, saturation, brightness, grey
    rows.append([0] * 11)  # untouched
    return np.float32(rows)


def randaugment_cases(size: int, m: int = 9, bins: int = 31) -> np.ndarray:
    """Every operation with both signs (one per view), then random pairs (two per view)."""
    from pipelines.kernels.randaugment import MAX_TRANSLATE_REL

    singles = []
    for op in range(len(RA_OPS)):
        for sign in (1.0, -1.0):
            p = np.zeros(RA_PARAMS_PER_OP, dtype=np.float32)
            ra_op_params(p, op, sign, float(m), float(bins), MAX_TRANSLATE_REL, size, size)
            singles.append(p)
    singles = np.stack(singles)
    rng = np.random.default_rng(1)
    pairs = np.concatenate([singles[rng.permutation(len(singles))], singles[rng.permutation(len(singles))]], axis=1)
    return singles, pairs


def ra_jigsaw_rows(ra: np.ndarray, jig: np.ndarray | None, grid: int) -> np.ndarray:
    """(K, P) ``randaugment_jigsaw`` parameters: the header, RandAugment's ``ra`` (K, 7 n), then
    the jigsaw's ``jig`` (K, 1 + grid^2) when ``grid`` > 0."""
    n_ops = ra.shape[1] // RA_PARAMS_PER_OP
    header = np.tile(np.float32([n_ops, grid]), (len(ra), 1))
    return np.ascontiguousarray(np.concatenate([header, ra] + ([jig] if grid else []), axis=1), dtype=np.float32)


def cases(size: int) -> dict[str, list[np.ndarray]]:
    """Per stage, one or more (K, P) parameter arrays (each one launch of K views)."""
    strong = get_preset("very_strong")
    rng = np.random.default_rng(2)
    blur_draws = np.float32([[0.0, u] for u in (0.0, 0.3, 0.7, 0.999)] + [[0.9, 0.5]])
    jigsaw_only = strong.replace(randaugment_n=0)
    jig = []
    for mode, p in (("global", 1.0), ("local", 1.0), ("global", 0.5)):
        draws = rng.random((10, F.plan(F.RA_JIGSAW, jigsaw_only, size)[0]))
        jig.append(F.params(F.RA_JIGSAW, jigsaw_only.replace(jigsaw_mode=mode, jigsaw_p=p), size, draws))
    jig = np.concatenate(jig)
    grid = strong.jigsaw_grid
    singles, pairs = randaugment_cases(size)
    tiles = jig[: len(pairs), F.HEADER :]
    return {
        "colour": [colour_cases()],
        "blur": [F.params("blur", strong, size, blur_draws)],
        F.RA_JIGSAW: [ra_jigsaw_rows(singles, None, 0), ra_jigsaw_rows(pairs, tiles, grid), jig],
    }


def cpu_run(name: str, img: np.ndarray, params: np.ndarray) -> np.ndarray:
    out = np.zeros_like(img)
    F.APPLY[name](out, img, np.ascontiguousarray(params))
    return out


def cuda_run(name: str, img: np.ndarray, params: np.ndarray, threads: int) -> np.ndarray:
    from pipelines.kernels import cuda as C

    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1":
        out, scratch = np.zeros_like(img), np.zeros_like(img)
        C.launch(name, out, img, np.ascontiguousarray(params), scratch=scratch, threads=threads)
        return out
    import torch

    x = torch.from_numpy(img).cuda()
    p = torch.from_numpy(np.ascontiguousarray(params)).cuda()
    out, scratch = torch.zeros_like(x), torch.zeros_like(x)
    C.launch(name, out, x, p, scratch=scratch, threads=threads)
    torch.cuda.synchronize()
    return out.cpu().numpy()


def perturbed(name: str, params: np.ndarray) -> np.ndarray:
    """The parameters slightly wrong (``--perturb``: shows that the comparison can fail)."""
    p = params.copy()
    if name == "colour":
        p[:, 2] *= np.float32(1.05)
    elif name == "blur":
        p[:, 2] *= np.float32(1.01)
    elif int(p[0, 0]) > 0:  # RandAugment's first operation
        p[:, F.HEADER + 1] += np.float32(0.1)
    else:  # the jigsaw's tiles reversed
        grid = int(p[0, 1])
        p[:, -grid * grid :] = p[:, : -grid * grid - 1 : -1]
    return p


def check(size: int, threads: int, stages=STAGES, perturb: bool = False) -> dict:
    """Per stage: views compared, values that differ, views that differ."""
    result = {}
    for name in stages:
        views = values = bad_views = 0
        for params in cases(size)[name]:
            img = images(len(params), size, seed=len(params))
            want = cpu_run(name, img, params)
            got = cuda_run(name, img, perturbed(name, params) if perturb else params, threads)
            diff = got != want
            views += len(params)
            values += int(diff.sum())
            bad_views += int(diff.any(axis=(1, 2, 3)).sum())
        result[name] = {"views": views, "values_differ": values, "views_differ": bad_views}
    return result


def timing(size: int, views: int, threads: int, repeats: int, preset_name: str) -> dict:
    """Per stage: ms per launch of ``views`` frames on the GPU, and the CPU kernel's ms (one core)."""
    import torch

    from pipelines.kernels import cuda as C

    preset = get_preset(preset_name)
    rng = np.random.default_rng(3)
    img = images(views, size)
    out = {}
    for name in STAGES:
        if name == F.RA_JIGSAW and preset.randaugment_n == 0:
            preset = get_preset("very_strong")
        params = F.params(name, preset, size, rng.random((views, F.plan(name, preset, size)[0])))
        x, p = torch.from_numpy(img).cuda(), torch.from_numpy(params).cuda()
        y, s = torch.zeros_like(x), torch.zeros_like(x)
        C.launch(name, y, x, p, scratch=s, threads=threads)  # compile
        torch.cuda.synchronize()
        gpu = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            C.launch(name, y, x, p, scratch=s, threads=threads)
            b.record()
            torch.cuda.synchronize()
            gpu.append(a.elapsed_time(b))
        cpu_run(name, img[:1], params[:1])  # compile
        cpu = []
        for _ in range(repeats):
            t = time.perf_counter()
            cpu_run(name, img, params)
            cpu.append((time.perf_counter() - t) * 1e3)
        out[name] = {"gpu_ms": statistics.median(gpu), "cpu_ms": statistics.median(cpu),
                     "speedup": statistics.median(cpu) / max(statistics.median(gpu), 1e-9)}  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32, help="view side of the bit-for-bit check (a multiple of 4)")
    ap.add_argument("--threads", type=int, default=128, help="CUDA threads per block (one block per view)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--repeats", type=int, default=20, help="timed launches per stage (0: check only)")
    ap.add_argument("--time-size", type=int, default=224, help="view side of the timing")
    ap.add_argument("--views", type=int, default=1024, help="frames per timed launch (batch x K)")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--simulate", action="store_true", help="Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
    ap.add_argument("--perturb", action="store_true", help="give the CUDA kernels slightly wrong parameters")
    args = ap.parse_args(argv)
    result = {"check": check(args.size, args.threads, args.stages, args.perturb), "size": args.size,
              "simulator": os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"}  # fmt: skip
    result["bit_exact"] = all(v["values_differ"] == 0 for v in result["check"].values())
    if args.repeats > 0:
        result["timing"] = timing(args.time_size, args.views, args.threads, args.repeats, args.preset)
        result["timing_setup"] = {"size": args.time_size, "views": args.views, "threads": args.threads}
    print(json.dumps(result))
    return 0 if result["bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
