"""Reading config values: YAML (a preset file or a command-line value) and ``key=value`` overrides,
applied onto the dataclasses of ensiam_fast/config.py with their types checked, naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any

import yaml

from ensiam_fast.errors import ConfigError


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless (int -> float), else raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key!r} expects a list of names such as [epochs], got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # no setting means anything at inf or nan (a timeout is a number of seconds)
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"config key {key!r} expects {tp.__name__}, got {value!r} ({type(value).__name__})")
    raise ConfigError(f"config key {key!r}: unsupported type {tp}")


def apply_values(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set ``values`` (a nested mapping; command-line text parsed once its key's type is known) on the
    dataclass ``obj``, each checked against its field's type; ConfigError naming the key otherwise."""
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown config key {name!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} is a section; give its fields, e.g. {name}.FIELD=...")
            apply_values(current, value, prefix=f"{name}.")
        else:
            if isinstance(value, _Raw):
                try:
                    value = value.parse(hints[key])
                except yaml.YAMLError as e:
                    raise ConfigError(
                        f"config key {name!r}: {str(value)!r} is not a valid value ({yaml_problem(e)})"
                    ) from e
            setattr(obj, key, _check_type(name, value, hints[key]))


class _Loader(yaml.SafeLoader):
    """YAML as users type numbers (PyYAML follows YAML 1.1, which reads ``1e-3`` and ``5E-4`` as text:
    its floats need a dot and a signed exponent), and a key given twice in one mapping is an error."""

    source = "the command line"

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in seen:
                raise ConfigError(f"{self.source}: key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line (PyYAML's own text spans several, with a caret drawing)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        what = " ".join(part for part in (e.context, e.problem) if part)
        return f"{what} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def load_yaml(text: str, source=None) -> Any:
    """``text`` read by ``_Loader`` (YAML as users type it); ``source`` names it in a duplicate-key error."""
    loader = _Loader(text)
    if source is not None:
        loader.source = str(source)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _Raw(str):
    """A command-line value, parsed once the type of its key is known: a ``str`` key takes the text
    as it is (so ``mixed_precision=no`` stays "no" rather than YAML's False), others parse as YAML."""

    def parse(self, tp: Any) -> Any:
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if str in args and not (type(None) in args and self in ("null", "~", "None")):
            return str(self)
        return load_yaml(self) if self != "" else None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": "1"}, "c": "x"}``; values stay text until their key's type
    is known (then YAML parses them, e.g. ``1`` -> 1, ``{p: 1}`` -> a mapping)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = _Raw(raw)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return tree
