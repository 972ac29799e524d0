"""The command the user typed, for usage lines: ``ensiam-train`` under the console command,
``python3 -m ensiam_fast.train`` under ``-m``, ``tools/make_shards.py`` or ``ensiam_fast/train.py`` when
a script path was run (directly or by ``accelerate launch``)."""

from __future__ import annotations

import argparse
import os
import sys


def command_name(fallback: str) -> str:
    """How this process was started, as the user wrote it; ``fallback`` when that is not ours to name
    (``main(argv)`` called from Python, e.g. under pytest)."""
    argv0 = sys.argv[0] if sys.argv else ""
    base = os.path.basename(argv0)
    if base.startswith("ensiam-"):  # a console command: pip's wrapper sets argv[0] to the command's path
        return base.removesuffix(".exe")
    orig = getattr(sys, "orig_argv", [])  # the interpreter's own command line (3.10+)
    if "-m" in orig[:-1]:
        module = orig[orig.index("-m") + 1]
        if module.split(".")[0] == "ensiam_fast":
            return f"{os.path.basename(orig[0])} -m {module}"
    if base.endswith(".py") and base != "__main__.py" and os.path.abspath(argv0).startswith(_project_root()):
        return argv0  # a script of this project, as typed
    return fallback


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def argument_parser(fallback: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """The parser of one of the project's commands: its usage line names the command as typed
    (``command_name(fallback)``) and its help starts with ``doc`` laid out as written."""
    return argparse.ArgumentParser(
        prog=command_name(fallback), description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )
