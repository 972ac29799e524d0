"""Where the CPU time of a DALI view goes: per-stage cost of the K-view pipeline's fused Numba
kernels (``pipelines.kernels``; the DALI-operator stages they were compared with are gone: the GPU
graph's stages are kernels too, ``tools/bench_gpu_graph.py``).

    python tools/bench_stages.py                                  # 224x224 from 500x375 JPEGs, default, K=4
    python tools/bench_stages.py --size 32 --preset very_strong   # CIFAR-like, with RandAugment and jigsaw

The pipeline is cut after each stage (decode, crop, colour, blur, RandAugment, jigsaw, flip +
HWC->CHW) and run on one DALI thread; a stage's cost is the CPU time per image (K views) of the
pipeline up to it minus that of the pipeline before it; medians over ``--repeats``. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import common  # tools/common.py: the checkout first on sys.path
from nvidia.dali import pipeline_def  # noqa: E402

from ensiam_fast.shards import shard_paths  # noqa: E402
from pipelines import dali as D  # noqa: E402
from pipelines.kernels import backend as cpu_backend  # noqa: E402
from pipelines.presets import get_preset  # noqa: E402
from tools.bench_pipeline import write_bench_dataset  # noqa: E402


def view_upto(images, preset, size: int, stop: int, kernels: str):
    """One view through the first ``stop`` stages of ``pipelines.dali.view_stages``."""
    v = images
    for _, stage in D.view_stages(preset, size, "cpu", kernels)[:stop]:
        v = stage(v)
    return v


@pipeline_def(enable_conditionals=True)
def cut_pipeline(tars, idxs, preset, size, views, stop, kernels):
    encoded, _ = D.read_shards(
        tars, idxs, labeled=True, shuffle=False, initial_fill=1, shard_id=0, num_shards=1, seed=0
    )
    images = D.decode(encoded, "cpu")
    if stop == 0:
        return images
    return tuple(view_upto(images, preset, size, stop, kernels) for _ in range(views))


def cpu_ms_per_image(tars, idxs, *, preset, size, views, stop, kernels, batch, iters) -> float:
    with D.origin_traces_off():
        pipe = cut_pipeline(tars, idxs, preset, size, views, stop, kernels, batch_size=batch, num_threads=1,
                            device_id=None, seed=1, prefetch_queue_depth=2)  # fmt: skip
    pipe.build()
    for _ in range(2):
        pipe.run()
    t = time.process_time()
    for _ in range(iters):
        pipe.run()
    ms = 1000.0 * (time.process_time() - t) / (iters * batch)
    del pipe
    return ms


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, choices=[32, 224], default=224)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--batch", type=int, default=None, help="default: 128 at 32x32, 32 at 224x224")
    ap.add_argument("--iters", type=int, default=8, help="timed batches per pipeline")
    ap.add_argument("--repeats", type=int, default=2)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if cpu_backend() != "numba":
        raise SystemExit("Numba is not usable here, so there is nothing to compare (pip install numba)")
    preset = get_preset(args.preset)
    batch = args.batch or (128 if args.size == 32 else 32)
    labels = ["decode", *(name for name, _ in D.view_stages(preset, args.size, "cpu", "numba"))]
    stops = list(range(len(labels)))  # 0: decode only; k: decode and the first k view stages
    cumulative: dict[str, dict[int, list[float]]] = {"numba": {}}
    with tempfile.TemporaryDirectory(prefix="bench_stages_") as tmp:
        root = write_bench_dataset(Path(tmp) / "data", args.size, batch * (args.iters + 2))
        tars, idxs = shard_paths(root, "train")
        for _ in range(args.repeats):
            for kernels in ("numba",):
                for s in stops:
                    ms = cpu_ms_per_image(tars, idxs, preset=preset, size=args.size, views=args.views, stop=s,
                                          kernels=kernels, batch=batch, iters=args.iters)  # fmt: skip
                    cumulative[kernels].setdefault(s, []).append(ms)
    rows = []
    for kernels, by_stop in cumulative.items():
        med = {s: statistics.median(v) for s, v in by_stop.items()}
        prev = 0.0
        for s in stops:
            rows.append({"kernels": kernels, "stage": labels[s], "ms_cpu_per_image": round(med[s] - prev, 3),
                         "cumulative_ms": round(med[s], 3)})  # fmt: skip
            prev = med[s]
    for r in rows:
        print(json.dumps(r), flush=True)
    totals = {k: round(statistics.median(v[stops[-1]]), 3) for k, v in cumulative.items()}
    result = {
        **common.result_head("bench_stages"),
        "size": args.size, "preset": args.preset, "views": args.views, "batch": batch, "repeats": args.repeats,
        "stages": rows,
        "total_ms_cpu_per_image": totals,
    }  # fmt: skip
    return common.print_result(result)


if __name__ == "__main__":
    main()
