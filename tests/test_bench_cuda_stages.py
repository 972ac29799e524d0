"""tools/bench_cuda_stages.py in process, its CPU half: the cases it launches and the mutation its
``--perturb`` check relies on. The CUDA half runs under Numba's simulator in a child interpreter
(tests/test_cuda_kernels.py, slow): the simulator switch must be set before Numba is imported."""

from __future__ import annotations

from pathlib import Path

import conftest
import numpy as np

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_cuda_stages.py"


def load_tool():
    return conftest.load_tool("bench_cuda_stages")


def test_every_case_changes_its_views_and_a_perturbed_parameter_shows(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOL.parent))  # the script's own `import common`
    tool = load_tool()
    size = 8
    cases = tool.cases(size)
    assert set(cases) == set(tool.STAGES)
    for name, launches in cases.items():
        for params in launches:
            img = tool.images(len(params), size, seed=len(params))
            out = tool.cpu_run(name, img, params)
            assert out.shape == img.shape and out.dtype == np.uint8
            assert (out != img).any(axis=(1, 2, 3)).any(), name  # the stage does something to some view
            np.testing.assert_array_equal(tool.cpu_run(name, img, params), out)  # deterministic
            # what --perturb feeds the CUDA kernels must change the CPU result too, or the check could not fail
            assert (tool.cpu_run(name, img, tool.perturbed(name, params)) != out).any(), name
