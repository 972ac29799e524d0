"""The GPU augmentation graph, weighed on the CPU: operators per iteration, and memory per view.

    python tools/bench_gpu_graph.py                         # this checkout
    python tools/bench_gpu_graph.py --before /work/main     # and another checkout's graph, same run
    python tools/bench_gpu_graph.py --before /tmp/base --before-kernels gpu_graph   # a fused-stage checkout

Operators: the K-view pipeline (``pipelines.dali.build_kview_pipeline``, 32x32 views from a tiny
shard) is defined with ``device="gpu"`` and traced (``pipe._build_graph()``, as
``tests/test_dali.py`` does; no GPU needed) and its operators (``pipe._ops``) are counted by where
they run (cpu, mixed, gpu), per preset and K.

Memory: the graph that runs on the CPU as the GPU graph's proxy (``data.cpu_kernels=gpu_graph``
here; a checkout whose GPU graph is DALI operators: ``data.cpu_kernels=dali``) draws ``--batches``
batches of ``--batch`` images x K views at each view size, each (checkout, preset, size) in a fresh
interpreter: after the pipeline is built the process's peak-RSS mark is reset
(``/proc/self/clear_refs``), and the peak over the batches minus the RSS before the first batch,
divided by batch x K, is the memory per view (``mb_per_view``). On a shared machine that figure
also counts library pages evicted by others' jobs and read back during the run; ``anon_mb_per_view``
counts only anonymous memory (``RssAnon``, its peak polled every millisecond while DALI's threads
run the batches), the buffers themselves. Each checkout is run from its own directory (its own
``pipelines``). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # noqa: E402  (tools/common.py: the checkout first on sys.path)

ROOT = Path(__file__).resolve().parents[1]

PRESETS = ("default", "very_strong")

COUNT = r"""
import collections, json, sys
from ensiam_fast.shards import shard_paths
from pipelines import dali as D
from pipelines.presets import get_preset
root, preset, views = sys.argv[1], sys.argv[2], int(sys.argv[3])
tars, idxs = shard_paths(root, "train")
with D.origin_traces_off():
    pipe = D.build_kview_pipeline(tars, idxs, labeled=True, preset=get_preset(preset), views=views, size=32,
                                  batch_size=8, device="gpu", device_id=0)
    pipe._build_graph()
ops = collections.Counter(o._op.device for o in pipe._ops)
print(json.dumps({"ops": dict(ops), "outputs": [n.device for n in pipe._graph_outputs]}))
"""

MEMORY = r"""
import json, sys
from ensiam_fast.shards import shard_paths
from pipelines import dali as D
from pipelines.presets import get_preset
root, preset, views, size, batch, batches, kernels = sys.argv[1:8]
views, size, batch, batches = int(views), int(size), int(batch), int(batches)
tars, idxs = shard_paths(root, "train")
pipe = D.build_kview_pipeline(tars, idxs, labeled=True, preset=get_preset(preset), views=views, size=size,
                              batch_size=batch, device="cpu", num_threads=1, cpu_kernels=kernels,
                              prefetch_queue_depth=1)
pipe.build()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import threading, time
anon = [status("RssAnon:")]
done = threading.Event()
def poll():  # the peak of the anonymous memory (DALI runs the graph in its own threads)
    while not done.is_set():
        anon[0] = max(anon[0], status("RssAnon:"))
        time.sleep(0.001)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
before = status("VmRSS:")
anon_before = anon[0] = status("RssAnon:")
poller = threading.Thread(target=poll, daemon=True)
poller.start()
for _ in range(batches):
    pipe.run()
done.set()
poller.join()
peak = status("VmHWM:")
anon_peak = max(anon[0], status("RssAnon:"))
print(json.dumps({"rss_before": before, "peak": peak, "per_view": (peak - before) / (batch * views),
                  "anon_per_view": (anon_peak - anon_before) / (batch * views)}))
"""


def run_json(code: str, checkout: Path, *args, timeout: int = 1800) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=checkout, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{checkout}: {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, default=None, help="another checkout (e.g. main) weighed in the same run")
    ap.add_argument("--before-kernels", default="dali", choices=["dali", "gpu_graph"],
                    help="data.cpu_kernels of --before's memory runs: 'dali' for a checkout whose GPU graph is DALI "
                         "operators, 'gpu_graph' for one with fused stages")  # fmt: skip
    ap.add_argument("--views", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224], choices=[32, 64, 224])
    ap.add_argument("--memory-views", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="images per batch of the memory runs")
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args(argv)
    from tools.bench_pipeline import write_bench_dataset

    graphs = [("after", ROOT, "gpu_graph")]
    if args.before is not None:
        graphs.insert(0, ("before", args.before.resolve(), args.before_kernels))
    result = {**common.result_head("bench_gpu_graph"), "ops": [], "memory": []}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_graph_") as tmp:
        data = {s: write_bench_dataset(Path(tmp) / f"d{s}", s, args.batch * (args.batches + 2)) for s in args.sizes}
        for label, checkout, _ in graphs:
            for preset in PRESETS:
                for k in args.views:
                    got = run_json(COUNT, checkout, data[32] if 32 in data else data[args.sizes[0]], preset, k)
                    row = {"graph": label, "preset": preset, "views": k, **got["ops"], "outputs": got["outputs"]}
                    result["ops"].append(row)
                    print(json.dumps(row), flush=True)
        for label, checkout, kernels in graphs:
            for preset in PRESETS:
                for size in args.sizes:
                    got = run_json(MEMORY, checkout, data[size], preset, args.memory_views, size, args.batch,
                                   args.batches, kernels)  # fmt: skip
                    row = {"graph": label, "preset": preset, "size": size, "views": args.memory_views,
                           "mb_per_view": round(got["per_view"] / 2**20, 2),
                           "anon_mb_per_view": round(got["anon_per_view"] / 2**20, 2),
                           "rss_before_mb": round(got["rss_before"] / 2**20, 1),
                           "peak_mb": round(got["peak"] / 2**20, 1)}  # fmt: skip
                    result["memory"].append(row)
                    print(json.dumps(row), flush=True)
    after = {(r["preset"], r["views"]): r.get("gpu", 0) for r in result["ops"] if r["graph"] == "after"}
    mem = {(r["preset"], r["size"]): r["mb_per_view"] for r in result["memory"] if r["graph"] == "after"}
    anon = {(r["preset"], r["size"]): r["anon_mb_per_view"] for r in result["memory"] if r["graph"] == "after"}
    targets = {}
    for k in (4, 8):
        if ("default", k) in after:
            targets[f"default_gpu_ops_k{k}<=60"] = after[("default", k)] <= 60
            targets[f"very_strong_gpu_ops_k{k}<=100"] = after[("very_strong", k)] <= 100
    if ("default", 224) in mem:
        targets["default_224_mb_per_view<=6"] = mem[("default", 224)] <= 6
        ratio = mem[("very_strong", 224)] / max(mem[("default", 224)], 0.01)
        targets["very_strong_224_within_1.5x_default"] = ratio <= 1.5
        result["ratio_224"] = round(ratio, 3)
        result["anon_ratio_224"] = round(anon[("very_strong", 224)] / max(anon[("default", 224)], 0.01), 3)
    result["targets"] = targets
    result["setup"] = {"batch": args.batch, "batches": args.batches, "memory_views": args.memory_views}
    return common.print_result(result)


if __name__ == "__main__":
    main()
