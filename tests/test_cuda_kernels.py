"""The CUDA stages of the GPU graph (``pipelines.kernels.cuda``) against the CPU kernels, bit for bit,
through Numba's CUDA simulator on this CPU-only machine.

The simulator is chosen when ``numba.cuda`` is first imported (``NUMBA_ENABLE_CUDASIM=1``), so each
check runs ``tools/bench_cuda_stages.py`` in a child interpreter: this process's Numba is untouched.
The cases cover every operation the presets use (each colour-jitter operation below and above 1,
hue both ways, grey, a five-operation sequence; blur at four sigmas and off; the 14 RandAugment
operations with both signs, one per view, then random pairs followed by a jigsaw global, local or
off, and the jigsaw alone: RandAugment and the jigsaw are one kernel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def simulated_check(*extra: str, size: int = 20) -> dict:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "tools" / "bench_cuda_stages.py"), "--size", str(size), "--threads", "16",
           "--repeats", "0", *extra]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cuda_stages_equal_the_cpu_kernels_bit_for_bit():
    """20x20 views (400 pixels: equalisation's table is not the identity), 16 threads per block (so
    every thread strides over many pixels and the reductions combine several threads)."""
    result = simulated_check()
    assert result["simulator"] is True
    check = result["check"]
    # RandAugment + jigsaw: the 28 single operations (no jigsaw), 28 pairs then a jigsaw, 30 jigsaws alone
    assert {k: v["views"] for k, v in check.items()} == {"colour": 13, "blur": 5, "randaugment_jigsaw": 86}
    assert all(v["values_differ"] == 0 for v in check.values()), check
    assert result["bit_exact"] is True


@pytest.mark.slow
def test_the_bit_for_bit_check_sees_a_wrong_parameter():
    """The same comparison with slightly wrong parameters given to the CUDA kernels finds the
    difference in every stage (the check above can fail). 8x8 views (the jigsaw's 4x4 grid divides
    them): a wrong parameter changes 11 of 13 colour, 4 of 5 blur and 50 of 86 RandAugment + jigsaw
    views there, and the simulator takes 6 s instead of 14 at 20x20."""
    result = simulated_check("--perturb", size=8)
    assert result["bit_exact"] is False
    assert all(v["views_differ"] > 0 for v in result["check"].values()), result["check"]
