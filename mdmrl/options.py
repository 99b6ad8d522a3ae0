"""Strict validation of TOML tables against option dataclasses.

Every recipe section and every plug-in's ``Options`` is a dataclass. A field's type
hint gives its type; ``field(metadata=...)`` may add:

- ``doc``: one line shown in docs/recipe-reference.md and the editor schema;
- ``min``, ``max``, ``min_exclusive``, ``max_exclusive``, ``choices``: allowed values
  (on a list, every item);
- ``no_effect``: a function of the built table returning why the key has no effect
  there (or None): a key the user *wrote* that has no effect is an error;
- ``plugin`` (see :func:`plugin_name`) and ``options_of`` (see :func:`plugin_options`):
  the field names a registered plug-in, or holds the options of the plug-in another
  field names, validated by that plug-in's own ``Options``.

A dataclass may also define ``check_options(self) -> list[str]``, relations between
its fields, each problem as ``"key: message"``.

:func:`build` converts a TOML table into the dataclass and reports *every* problem
(unknown keys, wrong types, non-finite or out-of-range numbers, missing required
fields, unknown plug-in names, keys with no effect), each with its dotted path, at
every depth. :func:`json_schema` describes the same dataclasses as a JSON Schema.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Union

_MISSING = dataclasses.MISSING


# -- helpers for declaring fields ------------------------------------------------------
def plugin_name(
    kind: str,
    default: Any = _MISSING,
    doc: str = "",
    accept: Callable[[type], str | None] | None = None,
) -> Any:
    """A ``str`` field naming a registered plug-in of ``kind`` ("schedule", "rewarder",
    ...). An unknown name is an error listing the available ones. ``accept(cls)``
    may refuse a registered class by returning why (e.g. "is a learned schedule; a
    fixed one is needed here"); refused names are left out of the listed ones."""
    return dataclasses.field(default=default, metadata={"doc": doc, "plugin": kind, "accept": accept})


def plugin_options(name_field: str, doc: str = "", attribute: str = "Options") -> Any:
    """A ``dict`` field holding the options of the plug-in named by the sibling field
    ``name_field`` (declared with :func:`plugin_name`). The table is validated by that
    plug-in's ``attribute`` dataclass (``Options`` unless told otherwise) at its own
    dotted path, and stays a plain table in the built dataclass (the plug-in builds
    the part it names from it, e.g. with :func:`build`)."""
    return dataclasses.field(
        default_factory=dict,
        metadata={"doc": doc, "options_of": name_field, "options_attribute": attribute},
    )


def plugin_table(class_name: str, kind: str, what: str = "", accept=None) -> type:
    """A dataclass for a table ``{ name = ..., options = { ... } }`` that names a
    registered plug-in of ``kind`` and holds its options (recipes' ``[backbone]``,
    ``[schedule]``, ...). Use it as a field's type in an ``Options`` dataclass to let
    a plug-in hold another plug-in, validated at every depth."""
    what = what or kind
    spec = dataclasses.make_dataclass(
        class_name,
        [
            ("name", str, plugin_name(kind, doc=f"registered {what} (see `mdmrl plugins`)", accept=accept)),
            (
                "options",
                dict,
                plugin_options("name", doc=f"options of that {what}, validated by its own schema"),
            ),
        ],
    )
    spec.__doc__ = f"A {what}: its registered name and its options."
    spec.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)
    return spec


def build_plugin(kind: str, name: str, table: dict | None, ctx: Any, path: str = "") -> Any:
    """Build the registered plug-in ``name`` of ``kind`` from its options ``table``, the
    way the recipe loader builds a part: for a plug-in whose options hold another
    plug-in's (:func:`plugin_options`), in its ``from_options``. The table was checked
    when the recipe was validated; a plug-in built from code with a bad table gets a
    :class:`~mdmrl.errors.ConfigError` naming ``path``."""
    from mdmrl.errors import ConfigError

    problems: list[str] = []
    cls = _plugin_class({"plugin": kind}, name, path or kind, problems)
    options = build(cls.Options, table or {}, path, problems) if cls is not None else None
    if problems:
        raise ConfigError(problems, source=path or kind)
    return cls.from_options(options, ctx)


# -- describing types and values ---------------------------------------------------------
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


def _is_table_type(tp: Any) -> bool:
    """A dataclass or a list of dataclasses: a field with its own nested problems."""
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return dataclasses.is_dataclass(inner)
    return dataclasses.is_dataclass(tp)


# -- conversion ----------------------------------------------------------------------------
def _convert(tp: Any, value: Any, path: str, problems: list[str], built: dict | None) -> Any:
    """Convert ``value`` to ``tp``; append problems and return None on failure."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        args = tuple(a for a in args if a is not type(None))
        if len(args) == 1 and (dataclasses.is_dataclass(args[0]) or typing.get_origin(args[0]) is list):
            # a table or list that may be left out: its own problems, at every depth
            return _convert(args[0], value, path, problems, built)
        for arg in args:
            sub: list[str] = []
            out = _convert(arg, value, path, sub, built)
            if not sub:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {_describe_value(value)}")
        return None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            problems.append(f"{path}: expected {_type_name(tp)}, got {_describe_value(value)}")
            return None
        return [_convert(inner, v, f"{path}[{i}]", problems, built) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table, got {_describe_value(value)}")
            return None
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table, got {_describe_value(value)}")
            return None
        return build(tp, value, path, problems, built)
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
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        problems.append(f"{path}: {value!r} is not allowed; choose one of: {allowed}")
        return
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{path}: must be a finite number, got {value}")
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            problems.append(f"{path}: {value} is below the minimum {meta['min']}")
        if "max" in meta and value > meta["max"]:
            problems.append(f"{path}: {value} is above the maximum {meta['max']}")
        if "min_exclusive" in meta and value <= meta["min_exclusive"]:
            problems.append(f"{path}: {value} must be greater than {meta['min_exclusive']}")
        if "max_exclusive" in meta and value >= meta["max_exclusive"]:
            problems.append(f"{path}: {value} must be less than {meta['max_exclusive']}")


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# -- plug-ins named by a field -----------------------------------------------------------
def accepted_plugins(meta: typing.Mapping) -> dict[str, type]:
    """name -> class of every registered plug-in a :func:`plugin_name` field accepts."""
    from mdmrl.plugins import get_registry

    accept = meta.get("accept")
    found = get_registry().parts.get(meta["plugin"], {})
    return {n: r.cls for n, r in sorted(found.items()) if accept is None or accept(r.cls) is None}


def _plugin_class(meta: typing.Mapping, name: str, path: str, problems: list[str]) -> type | None:
    """The class a :func:`plugin_name` field names, or None after appending why not."""
    from mdmrl.plugins import get_registry

    kind = meta["plugin"]
    reg = get_registry().parts.get(kind, {}).get(name)
    accept = meta.get("accept")
    why = None if reg is None or accept is None else accept(reg.cls)
    if reg is not None and why is None:
        return reg.cls
    if why is not None:
        problems.append(f"{path}: {name!r} {why}")
        return None
    available = ", ".join(accepted_plugins(meta)) or "(none installed)"
    problems.append(f"{path}: Unknown {kind} {name!r}. Available: {available}.")
    return None


def _field_value(f: dataclasses.Field, kwargs: dict) -> Any:
    if f.name in kwargs:
        return kwargs[f.name]
    if f.default is not _MISSING:
        return f.default
    return None


# -- building --------------------------------------------------------------------------------
def build(cls: type, table: dict, path: str, problems: list[str], built: dict | None = None) -> Any:
    """Build dataclass ``cls`` from ``table``; append every problem to ``problems``.

    Returns an instance (fields that failed keep their defaults) so that validation
    of later sections can go on; callers raise when ``problems`` is non-empty.
    ``built``, when given, receives the built ``Options`` of every nested
    :func:`plugin_options` table, keyed by its dotted path."""
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    known = ", ".join(fields) or "(none)"
    unknown = [key for key in table if key not in fields]
    if len(unknown) == 1:
        problems.append(f"{prefix}{unknown[0]}: unknown key; allowed keys here: {known}")
    elif unknown:  # one problem for the table: often one cause (a misspelt or missing plug-in name)
        where = path or unknown[0]
        problems.append(f"{where}: unknown keys {', '.join(unknown)}; allowed keys here: {known}")
    start = len(problems)
    failed: set[str] = set()  # fields whose value is unusable (a nested table's own problems do not count)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        fpath = f"{prefix}{name}"
        before = len(problems)
        if name in table:
            value = _convert(hints[name], table[name], fpath, problems, built)
            if value is not None or table[name] is None:
                _check_range(f.metadata, value, fpath, problems)
                kwargs[name] = value
        elif f.default is _MISSING and f.default_factory is _MISSING:
            problems.append(f"{fpath}: required, missing")
        elif f.default_factory is not _MISSING and dataclasses.is_dataclass(f.default_factory):
            # an absent table whose default is the dataclass itself: built from an empty
            # table, so that the plug-in options nested in it are validated too
            kwargs[name] = build(f.default_factory, {}, fpath, problems, built)
        if len(problems) > before and (
            not _is_table_type(hints[name]) or kwargs.get(name) is None or _own(problems[before:], fpath)
        ):
            failed.add(name)  # a value of this table, or of a nested table's own keys, is unusable
    _plugin_fields(fields, table, kwargs, prefix, problems, failed, built)
    own_failures = bool(failed) or any(k not in fields for k in table)
    try:
        instance = cls(**kwargs)
    except (TypeError, ValueError) as exc:  # defaults missing after earlier problems
        if len(problems) == start:
            problems.append(f"{path or cls.__name__}: {exc}")
        return None
    if not own_failures:
        _no_effect(instance, fields, table, prefix, problems)
        check = getattr(instance, "check_options", None)
        if callable(check):
            problems.extend(prefix + p for p in check())
    return instance


def _own(problems: list[str], path: str) -> bool:
    """Whether one of ``problems`` is about a key of the table at ``path`` itself (not
    of a table inside it): its values are then partly defaults, and checks of the
    table around it that read them are left for after the fix."""
    for p in problems:
        rest = p.split(": ", 1)[0][len(path) :]
        if p.startswith(path + ".") and not any(c in rest[1:] for c in ".[ "):
            return True
    return False


def _plugin_fields(
    fields: dict, table: dict, kwargs: dict, prefix: str, problems: list[str], failed: set, built
) -> None:
    """Check the plug-in names of this table and validate the options tables that
    belong to them."""
    classes: dict[str, type] = {}
    for name, f in fields.items():
        if "plugin" not in f.metadata or name in failed:
            continue
        value = _field_value(f, kwargs)
        if isinstance(value, str):
            before = len(problems)
            cls = _plugin_class(f.metadata, value, f"{prefix}{name}", problems)
            if cls is not None:
                classes[name] = cls
            elif len(problems) > before:
                failed.add(name)
    for name, f in fields.items():
        owner = f.metadata.get("options_of")
        if owner is None or owner not in classes or name in failed:
            continue
        options_cls = getattr(classes[owner], f.metadata.get("options_attribute", "Options"), None)
        value = kwargs.get(name, {})
        if options_cls is None or not isinstance(value, dict):
            continue
        before = len(problems)
        options = build(options_cls, value, f"{prefix}{name}", problems, built)
        if len(problems) == before and built is not None:
            built[f"{prefix}{name}"] = options


def _no_effect(instance: Any, fields: dict, table: dict, prefix: str, problems: list[str]) -> None:
    for key in table:
        rule = fields[key].metadata.get("no_effect")
        why = rule(instance) if rule is not None else None
        if why:
            problems.append(f"{prefix}{key}: has no effect {why}; remove it")


def ineffective(cls: type, table: Any, path: str = "") -> list[str]:
    """Dotted paths of the keys in ``table`` (at every depth) that have no effect there
    (their ``no_effect`` rule gives a reason). Problems of other kinds are ignored."""
    if not isinstance(table, dict):
        return []
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    instance = build(cls, table, path, [])
    prefix = f"{path}." if path else ""
    out: list[str] = []
    for key, value in table.items():
        f = fields.get(key)
        if f is None:
            continue
        rule = f.metadata.get("no_effect")
        if instance is not None and rule is not None and rule(instance):
            out.append(f"{prefix}{key}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            out += ineffective(tp, value, f"{prefix}{key}")
        elif _is_table_type(tp) and isinstance(value, list):
            (inner,) = typing.get_args(tp)
            for i, item in enumerate(value):
                out += ineffective(inner, item, f"{prefix}{key}[{i}]")
    return out


def check(instance: Any, path: str = "") -> list[str]:
    """Re-validate an already-built dataclass (after programmatic changes)."""
    problems: list[str] = []
    build(type(instance), to_dict(instance, effective=True), path, problems)
    return problems


def to_dict(instance: Any, effective: bool = False) -> dict:
    """A dataclass instance as a plain TOML-compatible dict (None fields dropped).
    With ``effective``, fields that have no effect (their ``no_effect`` rule gives a
    reason) are dropped too, so that the dict validates as a recipe again."""

    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            out = {}
            for f in dataclasses.fields(v):
                x = getattr(v, f.name)
                rule = f.metadata.get("no_effect")
                if x is None or (effective and rule is not None and rule(v)):
                    continue
                out[f.name] = clean(x)
            return out
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        return v

    return clean(instance)


# -- documentation -------------------------------------------------------------------------
def _constraint(meta: typing.Mapping) -> str:
    cons = []
    for key, sym in (("min", ">="), ("min_exclusive", ">"), ("max", "<="), ("max_exclusive", "<")):
        if key in meta:
            cons.append(f"{sym} {meta[key]}")
    if "choices" in meta:
        cons.append("one of " + ", ".join(str(c) for c in meta["choices"]))
    if "plugin" in meta:
        cons.append(f"a registered name of kind `{meta['plugin']}`")
    if "options_of" in meta:
        cons.append(f"options of the plug-in named by `{meta['options_of']}`")
    return "; ".join(cons)


def _nested_class(tp: Any) -> type | None:
    """The dataclass of a table field (``X``, ``X | None`` or ``list[X]``), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_args(tp) else [tp]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


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
        rows.append(
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": default,
                "constraint": _constraint(f.metadata),
                "doc": f.metadata.get("doc", ""),
                "nested": _nested_class(hints[f.name]),
                "many": typing.get_origin(hints[f.name]) is list,
            }
        )
    return rows


# -- JSON Schema -----------------------------------------------------------------------------
#: The JSON Schema dialect of :func:`json_schema`: draft 4, the one Taplo (the TOML
#: language server behind editors' TOML support) documents.
JSON_SCHEMA_DIALECT = "http://json-schema.org/draft-04/schema#"


def json_schema(cls: type, definitions: dict[str, Any]) -> dict:
    """A ``$ref`` to the JSON Schema of dataclass ``cls``, which is added (with every
    dataclass and plug-in ``Options`` it refers to) to ``definitions``."""
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key not in definitions:
        definitions[key] = {}  # placeholder: recursion stops here
        definitions[key] = _object_schema(cls, definitions)
    return {"$ref": f"#/definitions/{key}"}


def _object_schema(cls: type, definitions: dict) -> dict:
    hints = type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": {}}
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    if doc and not doc.startswith(f"{cls.__name__}("):  # not dataclasses' generated signature
        out["description"] = doc
    required = []
    choices = []
    for f in fields:
        out["properties"][f.name] = _field_schema(f, hints[f.name], definitions)
        if f.default is _MISSING and f.default_factory is _MISSING:
            required.append(f.name)
        if "options_of" in f.metadata:
            choices.append(
                _options_choice(f, {g.name: g for g in fields}[f.metadata["options_of"]], definitions)
            )
    if required:
        out["required"] = required
    choices = [c for c in choices if c]
    if choices:
        out["allOf"] = choices
    return out


def _options_choice(f: dataclasses.Field, owner: dataclasses.Field, definitions: dict) -> dict | None:
    """One branch per accepted plug-in: its name selects the schema of the options."""
    attribute = f.metadata.get("options_attribute", "Options")
    branches = []
    for name, cls in accepted_plugins(owner.metadata).items():
        options_cls = getattr(cls, attribute, None)
        if options_cls is None:
            continue
        branch: dict[str, Any] = {
            "properties": {owner.name: {"enum": [name]}, f.name: json_schema(options_cls, definitions)}
        }
        if owner.default != name:
            branch["required"] = [owner.name]
        branches.append(branch)
    return {"oneOf": branches} if branches else None


def _field_schema(f: dataclasses.Field, tp: Any, definitions: dict) -> dict:
    meta = f.metadata
    out = _type_schema(tp, meta, definitions)
    if "plugin" in meta:
        out["enum"] = list(accepted_plugins(meta))
    if "$ref" in out:
        out = {"allOf": [out]}  # draft 4 ignores the siblings of a $ref
    if meta.get("doc"):
        out["description"] = meta["doc"]
    default = f.default if f.default is not _MISSING else _MISSING
    if default is not _MISSING and default is not None:
        out["default"] = default
    return out


def _type_schema(tp: Any, meta: typing.Mapping, definitions: dict) -> dict:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]  # TOML has no null
        schemas = [_type_schema(a, meta, definitions) for a in args]
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return {"type": "array", "items": _type_schema(inner, meta, definitions)}
    if origin is dict or tp is dict:
        return {"type": "object"}
    if dataclasses.is_dataclass(tp):
        return json_schema(tp, definitions)
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp not in simple:
        return {}
    out: dict[str, Any] = {"type": simple[tp]}
    if "choices" in meta:
        out["enum"] = list(meta["choices"])
    for key, word, exclusive in (
        ("min", "minimum", False),
        ("max", "maximum", False),
        ("min_exclusive", "minimum", True),
        ("max_exclusive", "maximum", True),
    ):
        if key in meta and tp in (int, float):
            out[word] = meta[key]
            if exclusive:
                out["exclusive" + word.capitalize()] = True
    return out
