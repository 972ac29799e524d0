"""The console commands of pyproject's [project.scripts] and ``python -m`` for every module with a ``main``."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
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


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_usage_names_the_console_command(name, tmp_path):
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
def test_python_dash_m_runs_main(module):
    """``python -m MODULE --help`` prints the usage: the module runs its ``main`` (not silently nothing)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: {Path(sys.executable).name} -m {module} "), out.stdout[:300]


def test_a_script_path_is_named_as_typed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for script in ("tools/make_shards.py", "ensiam_fast/train.py"):  # the second: as accelerate launch runs it
        out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env, cwd=REPO,
                             timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.startswith(f"usage: {script} "), out.stdout[:300]


def tool_scripts() -> list[str]:
    """tools/*.py run as scripts (a ``__main__`` block) that import the package."""
    return sorted(
        p.name
        for p in (REPO / "tools").glob("*.py")
        if "__main__" in (text := p.read_text()) and re.search(r"^(from|import) ensiam_fast", text, re.M)
    )


@pytest.mark.parametrize("script", tool_scripts())
def test_tools_run_from_a_checkout_that_is_not_installed(script, tmp_path):
    """``python tools/X.py --help`` from another directory, with site-packages reachable but the
    project's own install hidden (``-S``: no .pth files, so no editable finder)."""
    import site

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
    out = subprocess.run([sys.executable, "-S", str(REPO / "tools" / script), "--help"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:"), out.stdout[:300]
