"""The thread governor: load sampling from /proc, the thread choice, and its application between batches."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from ensiam_fast import runtime
from ensiam_fast.runtime import GovernedLoader, ThreadGovernor, busy_ticks, configure_runtime, own_ticks, threads_for

STAT = """cpu  100 0 50 1000 10 0 0 0 0 0
cpu0 60 0 30 500 5 0 0 0 0 0
cpu1 40 0 20 500 5 0 0 0 0 0
intr 12345
"""


def test_threads_for():
    assert threads_for(0.0, 2) == 2 and threads_for(0.4, 2) == 2
    assert threads_for(0.6, 2) == 1 and threads_for(2.0, 2) == 1 and threads_for(9.0, 2) == 1
    assert threads_for(3.0, 8) == 5 and threads_for(0.0, 1) == 1


def test_busy_ticks_counts_only_our_cpus():
    assert busy_ticks({0, 1}, STAT) == 150 and busy_ticks({1}, STAT) == 60 and busy_ticks({5}, STAT) == 0


def test_own_ticks_grow_with_our_work():
    before = own_ticks()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    assert own_ticks() > before


def test_governor_needs_two_agreeing_samples_and_applies_on_the_caller():
    start = torch.get_num_threads()
    gov = ThreadGovernor(share=2)
    gov.observe(0.1)
    gov.observe(1.8)  # one loaded sample: a spike, no change yet
    assert gov.target == 2
    gov.observe(1.9)
    assert gov.target == 1
    loader = GovernedLoader(FakeLoader(), gov)
    seen = [torch.get_num_threads() for _ in loader.iter_from(1)]
    assert seen == [1, 1] and len(loader) == 3 and loader.extra == "kept"
    gov.observe(0.0)
    gov.observe(0.0)
    next(iter(loader))
    assert torch.get_num_threads() == 2
    gov.observe(2.0)
    gov.observe(2.0)
    gov.apply()
    gov.stop()  # restores the count it found
    assert torch.get_num_threads() == start


class FakeLoader:
    extra = "kept"

    def __len__(self):
        return 3

    def iter_from(self, start):
        yield from range(start, 3)


def test_threads_from_the_environment(monkeypatch):
    start = torch.get_num_threads()
    loader = FakeLoader()
    monkeypatch.delenv("ENSIAM_THREADS", raising=False)
    assert configure_runtime(loader, device_type="cpu") is loader and torch.get_num_threads() == start
    monkeypatch.setenv("ENSIAM_THREADS", "1")
    try:
        assert configure_runtime(loader, device_type="cpu") is loader and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(start)
    monkeypatch.setenv("ENSIAM_THREADS", "auto")
    governed = configure_runtime(loader, device_type="cpu")
    assert isinstance(governed, GovernedLoader) and list(governed.iter_from(0)) == [0, 1, 2]
    governed.governor.stop()


@pytest.mark.slow  # a child interpreter
@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) > 4 or not os.path.exists("/proc/stat"),
    reason="needs /proc and a small machine to load fully",
)
def test_governor_sees_other_processes_load():
    # Busy loops that are NOT our descendants (orphaned through a shell) must count as others' load.
    share = len(os.sched_getaffinity(0))
    loop = f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 &"
    out = subprocess.run(["sh", "-c", " ".join([loop + " echo $!;"] * share)], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    gov = ThreadGovernor(share=share, interval=0.3)
    try:
        gov.start()
        deadline = time.monotonic() + 20
        while gov.target != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gov.target == 1, gov.history
        assert max(others for _, others, _ in gov.history) > 0.5 * share
    finally:
        gov.stop()
        for pid in pids:
            os.kill(pid, 9)
    assert runtime.CLOCK_TICKS > 0


# Runs an entry point with a hook that records GOMP_SPINCOUNT at the moment torch is first imported
# (libgomp reads it then, once): the trainer's spin-wait must be in place before that.
SPIN_PROBE = r"""
import importlib.abc, os, runpy, sys
seen = []
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
        return None
sys.meta_path.insert(0, Probe())
sys.argv = [sys.argv[1], "--help"]
try:
    if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code in (0, None), e.code
print("SPIN", seen)
"""


@pytest.mark.slow  # a child interpreter
@pytest.mark.parametrize("entry", ["ensiam_fast/train.py", "ensiam_fast.train"])
@pytest.mark.parametrize(
    ("user_env", "expected"),
    [({}, "20000"), ({"GOMP_SPINCOUNT": "123"}, "123"), ({"OMP_WAIT_POLICY": "PASSIVE"}, None)],
)
def test_trainer_sets_openmp_spin_before_torch_loads(entry, user_env, expected):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(user_env, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", SPIN_PROBE, entry], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"SPIN [{expected!r}]" in out.stdout, out.stdout[-2000:]
