"""Strict validation of TOML tables against option dataclasses.

Every recipe section and every plug-in's ``Options`` is a dataclass. A field's type
hint gives its type; ``field(metadata=...)`` may add ``doc``, ``min``, ``max``,
``min_exclusive``, ``max_exclusive`` and ``choices``. :func:`build` converts a TOML
table into the dataclass and reports *every* problem (unknown keys, wrong types,
out-of-range values, missing required fields), each with its dotted path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

_MISSING = dataclasses.MISSING


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "none"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean " + str(value).lower()
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert ``value`` to ``tp``; append problems and return None on failure."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _convert(arg, value, path, sub)
            if not sub:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {_describe_value(value)}")
        return None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            problems.append(f"{path}: expected {_type_name(tp)}, got {_describe_value(value)}")
            return None
        return [_convert(inner, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table, got {_describe_value(value)}")
            return None
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table, got {_describe_value(value)}")
            return None
        return build(tp, value, path, problems)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{path}: expected {_type_name(tp)}, got {_describe_value(value)}")
    return None


def _check_range(meta: typing.Mapping, value: Any, path: str, problems: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_range(meta, v, f"{path}[{i}]", problems)
        return
    for v in [value]:
        if "choices" in meta and v not in meta["choices"]:
            allowed = ", ".join(str(c) for c in meta["choices"])
            problems.append(f"{path}: {v!r} is not allowed; choose one of: {allowed}")
            return
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if "min" in meta and v < meta["min"]:
                problems.append(f"{path}: {v} is below the minimum {meta['min']}")
            if "max" in meta and v > meta["max"]:
                problems.append(f"{path}: {v} is above the maximum {meta['max']}")
            if "min_exclusive" in meta and v <= meta["min_exclusive"]:
                problems.append(f"{path}: {v} must be greater than {meta['min_exclusive']}")
            if "max_exclusive" in meta and v >= meta["max_exclusive"]:
                problems.append(f"{path}: {v} must be less than {meta['max_exclusive']}")


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, table: dict, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``table``; append every problem to ``problems``.

    Returns an instance (fields that failed keep their defaults) so that validation
    of later sections can go on; callers raise when ``problems`` is non-empty.
    """
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    known = ", ".join(fields) or "(none)"
    for key in table:
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key; allowed keys here: {known}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        fpath = f"{prefix}{name}"
        if name in table:
            value = _convert(hints[name], table[name], fpath, problems)
            if value is not None or table[name] is None:
                _check_range(f.metadata, value, fpath, problems)
                kwargs[name] = value
        elif f.default is _MISSING and f.default_factory is _MISSING:
            problems.append(f"{fpath}: required, missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # defaults missing after earlier problems
        if not problems:
            problems.append(f"{path or cls.__name__}: {exc}")
        return None


def check(instance: Any, path: str = "") -> list[str]:
    """Re-validate an already-built dataclass (after programmatic changes)."""
    problems: list[str] = []
    build(type(instance), to_dict(instance), path, problems)
    return problems


def to_dict(instance: Any) -> dict:
    """A dataclass instance as a plain TOML-compatible dict (None fields dropped)."""

    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {
                f.name: clean(getattr(v, f.name))
                for f in dataclasses.fields(v)
                if getattr(v, f.name) is not None
            }
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        return v

    return clean(instance)


def describe(cls: type) -> list[dict]:
    """Rows documenting each field: name, type, default, constraint, doc."""
    hints = type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:
            d = f.default_factory()
            default = "table" if dataclasses.is_dataclass(d) else repr(d)
        else:
            default = "required"
        meta = f.metadata
        cons = []
        for key, sym in (("min", ">="), ("min_exclusive", ">"), ("max", "<="), ("max_exclusive", "<")):
            if key in meta:
                cons.append(f"{sym} {meta[key]}")
        if "choices" in meta:
            cons.append("one of " + ", ".join(str(c) for c in meta["choices"]))
        rows.append(
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": default,
                "constraint": "; ".join(cons),
                "doc": meta.get("doc", ""),
                "nested": hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None,
            }
        )
    return rows
