"""A split's content verdict: recorded in ``manifest.json`` by whoever checked its tars, read by
every loader before it reads them.

Conversion, adoption and ``make_shards.py --verify`` record, per split, under ``"check"``: who
checked (``by``), when (``at``, UTC), the version (``version``, ``verdict_format``), the result
(``ok`` or ``failed``), how many problems and the first, the pixel limit the images were held to,
and each tar's size and modification time. :func:`gate_split` turns that into what a loader does:
refuse a split whose last check failed (one line: the first problem and the fix), and warn once per
process when a split was never content-checked or its tars changed since (then the loader checks
what it reads itself, ``data/preflight.py``). The fields are documented in ``shards/README.md``.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ensiam_fast.shards.format import MANIFEST, ShardFormatError, index_name
from ensiam_fast.shards.manifest import Manifest, SplitInfo

VERDICT_FORMAT = 1
BY = ("conversion", "adoption", "verify")
FIX = (
    "`python tools/make_shards.py --verify {root} --drop-corrupt` drops the bad samples (or re-make the dataset "
    "with tools/make_shards.py)"
)
# What --drop-corrupt cannot repair (shards/repair.py rewrites shards whose only problems are bad samples):
# a tar cut or overwritten mid-way (shards/index.py's words), an index missing or not matching its tar (verify.py's).
STRUCTURAL = re.compile(r"truncated or corrupt|\.idx (is missing|lists|line \d+ lists)")
REMAKE = "re-make the dataset with tools/make_shards.py (the same command again redoes the shards that do not match)"
CHECK = "check it once with `python tools/make_shards.py --verify {root}` (it records the verdict)"
_warned: set[tuple[str, str, str]] = set()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("ensiam_fast")
    except PackageNotFoundError:
        return "unknown"


def tar_stats(root: Path, shards: list[str]) -> dict[str, list[int]]:
    """{tar name: [size, mtime in ns]} of a split's tars as they are now (missing ones left out)."""
    stats = {}
    for name in shards:
        try:
            st = os.stat(Path(root) / name)
        except OSError:
            continue
        stats[name] = [st.st_size, st.st_mtime_ns]
    return stats


def make_verdict(
    root: Path, info: SplitInfo, by: str, problems: list[str], max_pixels: int, num_classes: int | None = None
) -> dict:
    """The ``check`` record of a split just checked (``problems`` empty: it passed); ``num_classes``:
    the class count its labels were checked against."""
    assert by in BY, by
    return {
        "verdict_format": VERDICT_FORMAT,
        "by": by,
        "at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "version": version(),
        "result": "failed" if problems else "ok",
        "problems": len(problems),
        "first_problem": problems[0] if problems else None,
        "max_pixels": max_pixels,
        "tars": tar_stats(root, info.shards),
        # the indices too: an index edited to point elsewhere in an unchanged tar reads unchecked bytes
        "indices": tar_stats(root, [index_name(t) for t in info.shards]),
        # the labels were checked against this many classes: a manifest whose class list changed since
        # (cut by hand, say) leaves them unchecked
        "num_classes": num_classes,
    }


@dataclass(frozen=True)
class Verdict:
    """What a split's record means now: ``state`` is ``ok`` (checked, passed, tars unchanged),
    ``failed``, ``unchecked`` (never, or a record this version cannot read) or ``changed``."""

    state: str
    message: str = ""
    trusted: frozenset[str] = frozenset()  # tars that passed the check and are unchanged since


def _valid(check: dict) -> bool:
    tars = check.get("tars")
    return (
        type(check.get("verdict_format")) is int
        and check.get("result") in ("ok", "failed")
        and isinstance(tars, dict)
        and all(isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v) for v in tars.values())
    )


def judge(root: Path, name: str, info: SplitInfo) -> Verdict:
    """Read one split's record against its tars as they are now."""
    where = f"split {name!r} of {root}"
    check = info.check
    if check is None:
        return Verdict(
            "unchecked", f"{where} was never content-checked (an older manifest); " + CHECK.format(root=root)
        )
    if check.get("result") == "failed":  # whatever else the record says: never train on it
        first = check.get("first_problem") or "no problem recorded"
        more = check.get("problems")
        more = f" (and {more - 1} more)" if type(more) is int and more > 1 else ""
        return Verdict(
            "failed",
            f"{where} failed its last check ({check.get('by', '?')}, {check.get('at', '?')}): {first}{more}; "
            + (REMAKE if STRUCTURAL.search(str(first)) else FIX.format(root=root)),
        )
    if not _valid(check):
        return Verdict(
            "unchecked",
            f"{where}: its check record in {MANIFEST} is not one this version reads (edited by hand?); "
            + CHECK.format(root=root),
        )
    if check["verdict_format"] > VERDICT_FORMAT:
        return Verdict(
            "unchecked",
            f"{where} was checked by a newer ensiam_fast ({check.get('version')}, verdict format "
            f"{check['verdict_format']}), which this one cannot read; " + CHECK.format(root=root),
        )
    now = tar_stats(root, info.shards)
    now_idx = tar_stats(root, [index_name(t) for t in info.shards])
    indices = check.get("indices") if isinstance(check.get("indices"), dict) else None  # absent in early records

    def why(tar: str) -> str | None:
        then = check["tars"].get(tar)
        if then is None:
            return "was not part of it"
        if then != now.get(tar):
            return f"size/mtime {then} then, {now.get(tar)} now"
        if indices is not None and indices.get(index_name(tar)) != now_idx.get(index_name(tar)):
            return f"its index {index_name(tar)} changed"
        return None

    reasons = {tar: why(tar) for tar in info.shards}
    trusted = frozenset(tar for tar, reason in reasons.items() if reason is None)
    changed = [t for t in info.shards if t not in trusted]
    if changed:
        what = reasons[changed[0]]
        return Verdict(
            "changed",
            f"{where}: {len(changed)} of its tars changed since the check of {check.get('at', '?')} "
            f"({changed[0]} {what}); " + CHECK.format(root=root),
            trusted,
        )
    return Verdict("ok", "", trusted)


def gate_split(root: str | os.PathLike, manifest: Manifest, split: str) -> frozenset[str]:
    """Refuse (``ShardFormatError``) a split, or any part of ``a+b``, whose last check failed; warn
    once per process when one was never checked or changed since. Returns the tars (names as the
    manifest lists them) that passed a check and are unchanged: the loader checks only the others."""
    root = Path(root)
    manifest.split(split)  # an unknown name: the usual error
    trusted: frozenset[str] = frozenset()
    for part in split.split("+"):
        verdict = judge(root, part, manifest.splits[part])
        then = (manifest.splits[part].check or {}).get("num_classes")
        if verdict.state == "ok" and type(then) is int and then != manifest.num_classes:
            verdict = Verdict(
                "changed",
                f"split {part!r} of {root}: its labels were checked against {then} classes and {MANIFEST} now "
                f"names {manifest.num_classes}; " + CHECK.format(root=root),
            )
        if verdict.state == "failed":
            raise ShardFormatError(verdict.message)
        trusted |= verdict.trusted
        if verdict.state != "ok":
            key = (str(root.resolve()), part, verdict.message)
            if key not in _warned:
                _warned.add(key)
                note = "; until then the loader checks the labels and images of those tars itself"
                warnings.warn(verdict.message + note, stacklevel=2)
    return trusted
