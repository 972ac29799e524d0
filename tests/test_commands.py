"""The console commands of pyproject's [project.scripts] and ``python -m`` for every module with a ``main``."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# tomllib is 3.11+ and the package supports 3.10: read the one flat table by hand
_TABLE = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[)", (REPO / "pyproject.toml").read_text(), re.M | re.S)
SCRIPTS = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', _TABLE.group(1), re.M))


def test_the_console_commands_are_declared():
    assert set(SCRIPTS) == {"ensiam-train", "ensiam-make-shards", "ensiam-evaluate", "ensiam-export", "ensiam-launch"}


# what pip writes as a console command's script (its argv[0] is the command's path)
PIP_WRAPPER = """import re, sys
from {module} import {func}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({func}())
"""


def run_help(monkeypatch, capsys, call, argv0: str, orig_argv: list[str]) -> str:
    """``call()`` in this process as if started by ``orig_argv`` (argv[0] = ``argv0``, then
    ``--help``): the usage it prints. The usage line names the command from sys.argv and
    sys.orig_argv, so these are what a child interpreter would have."""
    monkeypatch.setattr(sys, "path", sys.path[:])  # scripts put their checkout first: undone after
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    monkeypatch.setattr(sys, "orig_argv", orig_argv, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_usage_names_the_console_command(name, tmp_path, monkeypatch, capsys):
    """pip's wrapper calls ``main()`` with no arguments and argv[0] the command's path: the usage
    line names the command (in process; the child-interpreter form is the slow test below)."""
    module, _, func = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), func)
    script = str(tmp_path / "bin" / name)
    out = run_help(monkeypatch, capsys, main, script, [sys.executable, script, "--help"])
    assert out.startswith(f"usage: {name} "), out[:300]


@pytest.mark.slow
def test_usage_names_the_console_command_through_pips_wrapper(tmp_path):
    """The same as above through a real child interpreter running pip's wrapper, for one command."""
    name = "ensiam-make-shards"
    module, _, func = SCRIPTS[name].partition(":")
    script = tmp_path / "bin" / name
    script.parent.mkdir()
    script.write_text(PIP_WRAPPER.format(module=module, func=func))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: {name} "), out.stdout[:300]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_command_answers_help(name, capsys):
    """The entry point a console script calls exists and prints its usage (what pip's wrapper runs)."""
    module, _, func = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def modules_with_main() -> list[str]:
    """Every module of the package that defines a top-level ``main`` (a package: its ``__main__``)."""
    found = []
    for path in sorted((REPO / "ensiam_fast").rglob("*.py")):
        if re.search(r"^def main\(", path.read_text(), re.M):
            parts = path.relative_to(REPO).with_suffix("").parts
            if path.parent.joinpath("__main__.py").exists() and path.name != "__main__.py":
                parts = parts[:-1]  # the package runs it: python -m ensiam_fast.evaluate
            found.append(".".join(parts))
    return sorted(set(found))


def test_modules_with_main_are_found():
    assert {"ensiam_fast.train", "ensiam_fast.export", "ensiam_fast.evaluate"} <= set(modules_with_main())


@pytest.mark.parametrize("module", modules_with_main())
def test_python_dash_m_runs_main(module, monkeypatch, capsys):
    """``python -m MODULE --help`` prints the usage: the module's ``__main__`` block runs its ``main``
    (not silently nothing). Run in process by runpy, as ``-m`` runs it."""
    spec = importlib.util.find_spec(module)
    path = spec.submodule_search_locations and str(Path(spec.origin).parent / "__main__.py") or spec.origin
    with warnings.catch_warnings():  # runpy warns that the module is already imported (by this suite)
        warnings.simplefilter("ignore", RuntimeWarning)
        out = run_help(monkeypatch, capsys, lambda: runpy.run_module(module, run_name="__main__", alter_sys=True),
                       path, [sys.executable, "-m", module, "--help"])  # fmt: skip
    assert out.startswith(f"usage: {Path(sys.executable).name} -m {module} "), out[:300]


def test_the_old_convert_command_still_runs_the_converter(monkeypatch, capsys):
    """``python -m ensiam_fast.convert`` (kept for old instructions) runs make_shards' own ``main``."""
    spec = importlib.util.find_spec("ensiam_fast.convert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = run_help(monkeypatch, capsys, lambda: runpy.run_module("ensiam_fast.convert", run_name="__main__",
                                                                     alter_sys=True),
                       spec.origin, [sys.executable, "-m", "ensiam_fast.convert", "--help"])  # fmt: skip
    assert out.startswith(f"usage: {Path(sys.executable).name} -m ensiam_fast.convert "), out[:300]
    assert "--dataset" in out and "--drop-corrupt" in out  # the converter's options


@pytest.mark.slow
def test_python_dash_m_runs_main_in_a_child_interpreter():
    """The same as above through a real ``python -m``, for the trainer."""
    module = "ensiam_fast.train"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: {Path(sys.executable).name} -m {module} "), out.stdout[:300]


@pytest.mark.parametrize(
    "script", ["tools/make_shards.py", "ensiam_fast/train.py"]
)  # the second: as accelerate launch runs it
def test_a_script_path_is_named_as_typed(script, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = run_help(monkeypatch, capsys, lambda: runpy.run_path(script, run_name="__main__"), script,
                       [sys.executable, script, "--help"])  # fmt: skip
    assert out.startswith(f"usage: {script} "), out[:300]


def tool_scripts() -> list[str]:
    """tools/*.py run as scripts (a ``__main__`` block) that import the package."""
    return sorted(
        p.name
        for p in (REPO / "tools").glob("*.py")
        if "__main__" in (text := p.read_text()) and re.search(r"^(from|import) ensiam_fast", text, re.M)
    )


def test_tool_scripts_are_found():
    assert {"make_shards.py", "grad_variance.py", "bench_pipeline.py"} <= set(tool_scripts())


@pytest.mark.parametrize("script", tool_scripts())
def test_tools_answer_help(script, monkeypatch, capsys):
    """``python tools/X.py --help`` prints a usage (in process, as the script runs)."""
    path = str(REPO / "tools" / script)
    monkeypatch.syspath_prepend(str(REPO / "tools"))  # what running a script puts first on the path
    out = run_help(monkeypatch, capsys, lambda: runpy.run_path(path, run_name="__main__"), path,
                   [sys.executable, path, "--help"])  # fmt: skip
    assert out.startswith("usage:"), out[:300]


# Runs each tools/ script given as ``--help`` in turn, each as ``python tools/X.py`` would: the script's
# folder first on sys.path and nothing of the checkout imported, so each script's own path set-up must
# find the package. Modules from site-packages (torch, DALI) stay imported between scripts, as they
# cannot be imported twice; those of the checkout are forgotten.
CHECKOUT_HELP = """
import contextlib, io, json, os, runpy, sys
base_path = list(sys.path)
checkout = os.path.realpath(sys.argv[1])
results = {}
for script in sys.argv[2:]:
    for name, module in list(sys.modules.items()):
        where = os.path.realpath(getattr(module, "__file__", None) or "/")
        if where.startswith(checkout + os.sep):
            del sys.modules[name]
    sys.path[:] = [os.path.dirname(script), *base_path]
    sys.argv = [script, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        code = f"{type(e).__name__}: {e}"
    results[os.path.basename(script)] = [code, out.getvalue()[:300]]
print(json.dumps(results))
"""


@pytest.mark.slow  # one child interpreter for every script
def test_tools_run_from_a_checkout_that_is_not_installed(tmp_path):
    """``python tools/X.py --help`` from another directory, with site-packages reachable but the
    project's own install hidden (``-S``: no .pth files, so no editable finder). What is checked is
    each script's own path set-up at start, so it runs in a child interpreter: one for all of them
    (it forgets the checkout's modules before each script), not one each."""
    import site

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
    scripts = [str(REPO / "tools" / s) for s in tool_scripts()]
    out = subprocess.run([sys.executable, "-S", "-c", CHECKOUT_HELP, str(REPO), *scripts], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(results) == tool_scripts()
    bad = {s: r for s, r in results.items() if r[0] not in (0, None) or not r[1].startswith("usage:")}
    assert not bad, bad
