"""The grid of ``tools/compare.py``: axis flags or a grid file -> run specs, each config checked first.

Grid file (YAML)::

    config: demo                         # the trainer's config for every run
    set: [data.root=shards/digits]       # key=value overrides for every run
    linear: {epochs: 100, precomputed: true}   # options of `python -m ensiam_fast.evaluate linear`
    blocks:                              # each: the product of its axes; an axis left out: the config's value
      - {methods: [ensiam, simsiam_kaug], views: [4], presets: [default, very_strong], seeds: [0, 1, 2]}
      - {methods: [ensiam, simsiam_kaug], views: [2, 8]}

``simsiam`` is defined with 2 views: in a block it runs at K=2 whatever ``views`` says. Runs that
several blocks share run once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from pathlib import Path

import common  # noqa: F401  (tools/common.py: the checkout first on sys.path)
import yaml

from ensiam_fast.config import load_config
from ensiam_fast.config_parse import load_yaml, yaml_problem
from ensiam_fast.errors import ConfigError, UserError
from ensiam_fast.evaluate.linear import LinearSettings
from ensiam_fast.shards import ShardFormatError, read_manifest

AXES = ("methods", "views", "presets", "batch_sizes", "seeds")
GRID_KEYS = {"config", "set", "linear", "blocks"}
# the options of `evaluate linear`: LinearSettings' fields (its own copy of the list had lost momentum)
LINEAR_FLAGS = {f.name for f in fields(LinearSettings)} | {"precomputed"}


def check_linear(linear: dict, where: str) -> None:
    """The linear evaluation's settings checked by its own rules (LinearSettings.check) before any run
    trains, not after the first run's pretraining."""
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in linear.items() if k != "precomputed"}
    try:
        LinearSettings(**given).check()
    except (UserError, TypeError, ValueError) as e:
        raise GridError(f"{where}: linear: {e}") from None


class GridError(ValueError):
    """A grid that cannot run; the message names the file, key or value and what to do."""


@dataclass(frozen=True)
class RunSpec:
    method: str
    views: int
    preset: str
    batch_size: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-k{self.views}-{self.preset}-b{self.batch_size}-s{self.seed}"

    def overrides(self) -> list[str]:
        return [
            f"method={self.method}",
            f"views={self.views}",
            f"data.preset={self.preset}",
            f"batch_size={self.batch_size}",
            f"seed={self.seed}",
        ]


@dataclass
class Grid:
    config: str
    set: list[str]
    linear: dict
    runs: list[RunSpec]


# ---------------------------------------------------------------------------------------------
# the grid: flags or a file -> run specs, every config checked before anything runs


def _as_list(value, key: str, kind) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise GridError(f"{key} is empty: give at least one value")
    try:
        return [kind(v) for v in values]
    except (TypeError, ValueError):
        raise GridError(f"{key}={value!r}: every value must be a {kind.__name__}") from None


def expand_block(block: dict, base, where: str) -> list[RunSpec]:
    """The run specs of one block of axes; an axis left out takes the base config's value."""
    unknown = set(block) - set(AXES)
    if unknown:
        raise GridError(f"{where}: unknown axis {sorted(unknown)}; axes are {', '.join(AXES)}")
    methods = _as_list(block.get("methods", base.method), f"{where}.methods", str)
    views = _as_list(block.get("views", base.views), f"{where}.views", int)
    presets = _as_list(block.get("presets", base.data.preset), f"{where}.presets", str)
    batches = _as_list(block.get("batch_sizes", base.batch_size), f"{where}.batch_sizes", int)
    seeds = _as_list(block.get("seeds", base.seed), f"{where}.seeds", int)
    specs = []
    for method, k, preset, batch, seed in itertools.product(methods, views, presets, batches, seeds):
        specs.append(RunSpec(method, 2 if method == "simsiam" else k, preset, batch, seed))
    return specs


def build_grid(config: str, sets: list[str], linear: dict, blocks: list[dict], where: str) -> Grid:
    try:
        base = load_config(config, sets)
    except ConfigError as e:
        raise GridError(f"{where}: config {config!r} with set {sets}: {e}") from None
    try:  # the dataset once, before any run starts (each run's trainer checks it again)
        read_manifest(base.data.root)
    except ShardFormatError as e:
        raise GridError(f"{where}: data.root: {e}") from None
    bad = set(linear) - LINEAR_FLAGS
    if bad:
        raise GridError(f"{where}: linear: unknown option {sorted(bad)}; options: {', '.join(sorted(LINEAR_FLAGS))}")
    check_linear(linear, where)
    runs: list[RunSpec] = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise GridError(f"{where}: blocks[{i}] must be a mapping of axes, got {block!r}")
        for spec in expand_block(block, base, f"{where}: blocks[{i}]"):
            if spec not in runs:  # blocks may overlap (the reference point of several trends)
                runs.append(spec)
    for spec in runs:  # the trainer's own validation, before any run starts
        try:
            load_config(config, [*sets, *spec.overrides()])
        except ConfigError as e:
            raise GridError(f"{where}: run {spec.name}: {e}") from None
    return Grid(config, list(sets), dict(linear), runs)


def read_grid_file(path: Path) -> Grid:
    try:
        values = load_yaml(path.read_text(), path)  # as config files are read: a duplicate key is named
    except OSError as e:
        raise GridError(f"grid file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise GridError(f"grid file {path} is not valid YAML: {yaml_problem(e)}") from None
    except ConfigError as e:
        raise GridError(f"grid file {e}") from None  # e names the file and both lines
    if not isinstance(values, dict) or "blocks" not in values:
        raise GridError(f"grid file {path} must be a mapping with a 'blocks' list (see tools/compare.py --help)")
    unknown = set(values) - GRID_KEYS
    if unknown:
        raise GridError(f"grid file {path}: unknown key {sorted(unknown)}; keys are {', '.join(sorted(GRID_KEYS))}")
    blocks = values["blocks"]
    if not isinstance(blocks, list) or not blocks:
        raise GridError(f"grid file {path}: 'blocks' must be a non-empty list of mappings")
    sets = values.get("set") or []
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise GridError(f"grid file {path}: 'set' must be a list of key=value strings")
    linear = values.get("linear") or {}
    if not isinstance(linear, dict):
        raise GridError(f"grid file {path}: 'linear' must be a mapping of evaluate options")
    return build_grid(str(values.get("config", "demo")), sets, linear, blocks, f"grid file {path}")


def grid_from_flags(args) -> Grid:
    block = {}
    for axis in AXES:
        value = getattr(args, axis)
        if value is not None:
            block[axis] = [v for v in value.split(",") if v]
    linear = {"epochs": args.linear_epochs}
    if args.linear_batch_size:
        linear["batch_size"] = args.linear_batch_size
    if args.linear_precomputed:
        linear["precomputed"] = True
    return build_grid(args.config, args.set, linear, [block], "flags")
