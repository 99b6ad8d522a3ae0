"""Fuzzed bad recipes: hypothesis mutates the shipped recipes (wrong types, unknown keys
at every depth, out-of-range and non-finite numbers, arrays where tables belong and the
reverse, missing keys, non-UTF-8 bytes, duplicate keys) and every mutation either
validates or is refused with exit code 2 and one line naming the field (or, for bytes
that are not TOML, the file and its line; one mutation makes one problem, no cascade of
follow-up errors): never a traceback, and
`mdmrl run` of a refused recipe never creates or touches a run directory.

Validation runs in this process through the command line's ``main``."""

import contextlib
import io
import json
import math
import re
import tempfile
from pathlib import Path

import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdmrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "recipes").rglob("*.toml"))}
PARSED = {name: tomllib.loads(text) for name, text in SOURCES.items()}
NAMES = sorted(SOURCES)

#: one problem: a dotted field path (or two joined by " + "), a colon, the message
PROBLEM = re.compile(r"^(?P<path>[A-Za-z_][\w\-]*(\[\d+\])*(\.[\w\-]+(\[\d+\])*)*)( \+ [\w.\[\]\-]+)?: \S")

OTHER_TYPES = ["text", 7, 2.5, True, [1, 2], {"key": 1}, [{"name": "x"}]]
NUMBERS = [0, -1, -0.5, 1e300, -1e300, math.nan, math.inf, -math.inf, 2**63 - 1, -(2**63)]


# -- a TOML writer for mutated tables (inline tables and arrays: any shape, any depth)
def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_\-]+", k) else json.dumps(k)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"


def to_toml(data: dict) -> str:
    return "".join(f"{_key(k)} = {_value(v)}\n" for k, v in data.items())


# -- where a mutation can go ----------------------------------------------------------
def _paths(node, path=()):
    """(path, value) of every key below ``node``; a path is a tuple of keys and indices."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        if isinstance(node, list) and not isinstance(v, dict):
            continue  # items of plain arrays are checked with their array
        yield (*path, k), v
        if isinstance(v, (dict, list)):
            yield from _paths(v, (*path, k))


def _dotted(path) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


def _parent(path):
    return path[:-1]


def _set(data, path, value):
    node = data
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()


@st.composite
def mutations(draw):
    """(recipe name, recipe text, what was mutated, kind): the mutated path for changes
    of the table, the repeated key for "duplicate", the line of the bytes for "utf8"."""
    name = draw(st.sampled_from(NAMES))
    data = json.loads(json.dumps(PARSED[name]))  # a deep copy
    kind = draw(st.sampled_from(["type", "unknown", "number", "shape", "missing", "utf8", "duplicate"]))
    text = SOURCES[name]
    if kind == "utf8":
        raw = text.encode()
        at = draw(st.integers(0, len(raw)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\x80\x80", b"\xfe\xff"]))
        return name, raw[:at] + bad + raw[at:], raw[:at].count(b"\n") + 1, kind
    if kind == "duplicate":
        lines = text.splitlines(keepends=True)
        candidates = [i for i, x in enumerate(lines) if re.match(r"^\s*[\w\-]+\s*=", x)]
        i = draw(st.sampled_from(candidates))
        return (
            name,
            "".join(lines[: i + 1] + [lines[i]] + lines[i + 1 :]),
            lines[i].split("=")[0].strip(),
            kind,
        )
    every = list(_paths(data))
    if kind == "unknown":
        tables = [()] + [p for p, v in every if isinstance(v, dict)]
        where = draw(st.sampled_from(tables))
        key = draw(st.sampled_from(["zz_typo", "nme", "optons", "Seed"]))
        path = (*where, key)
        _set(data, path, draw(st.sampled_from([1, "x", {"a": 1}])))
    elif kind == "type":
        path, old = draw(st.sampled_from(every))
        new = draw(st.sampled_from([v for v in OTHER_TYPES if type(v) is not type(old)]))
        _set(data, path, new)
    elif kind == "number":
        numeric = [p for p, v in every if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not numeric:
            return name, to_toml(data), None, "none"
        path = draw(st.sampled_from(numeric))
        _set(data, path, draw(st.sampled_from(NUMBERS) | st.integers(-(2**63), 2**63 - 1) | st.floats()))
    elif kind == "shape":
        shaped = [(p, v) for p, v in every if isinstance(v, (dict, list))]
        path, old = draw(st.sampled_from(shaped))
        if isinstance(old, dict):
            new = draw(st.sampled_from([[1, 2], [old], []]))
        else:
            new = draw(st.sampled_from([{}, {"0": old[0]} if old else {"a": 1}]))
        _set(data, path, new)
    else:  # missing
        path, _ = draw(st.sampled_from(every))
        _set(data, path, _DELETE)
    return name, to_toml(data), path, kind


def _related(problem_path: str, mutated) -> bool:
    """The problem names the mutated field, a table around it, something inside it, or
    a key of the same table (a relation such as batch_size and group_size, or a key
    whose effect depends on the mutated mode)."""
    p = _dotted(mutated)
    parent = _dotted(_parent(mutated))

    def inside(a: str, b: str) -> bool:  # a is b or below it
        return a == b or a.startswith(b + ".") or a.startswith(b + "[") or not b

    return inside(problem_path, p) or inside(p, problem_path) or inside(problem_path, parent)


def _call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_every_mutation_validates_or_gets_one_line_naming_the_field(case):
    name, text, mutated, kind = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        code, out, err = _call(["validate", str(path)])
        assert "Traceback" not in err + out
        assert code in (0, 2), (name, kind, err)
        if code == 0:
            assert "valid" in out and err == ""
            return
        lines = err.splitlines()
        assert lines[0].startswith(f"mdmrl: error: {path}: "), err
        if kind == "utf8":
            assert err == f"mdmrl: error: {path}: not a UTF-8 text file (invalid byte at line {mutated})\n"
            return
        if kind == "duplicate" or "TOML syntax error" in err:
            assert len(lines) == 1 and "TOML syntax error" in err, err
            if kind == "duplicate":
                assert mutated in err, (mutated, err)  # the repeated key's line is quoted
            return
        head = lines[0][len(f"mdmrl: error: {path}: ") :]
        if head.startswith("empty recipe;"):  # the mutation removed the only table
            assert len(lines) == 1 and mutated in [("pretrain",)], err
            return
        if len(lines) == 1:  # one problem: "N problem(s): <path>: <message>"
            problems = [head.split(": ", 1)[1]] if head.startswith("1 problem(s): ") else [head]
        else:  # "N problems:" then one indented line per problem
            assert head == f"{len(lines) - 1} problems:", err
            problems = [x.strip() for x in lines[1:]]
        for problem in problems:
            assert PROBLEM.match(problem), (problem, err)
        # one mutation, one problem (no cascade of follow-up errors), about the mutated field
        assert len(problems) == 1, (kind, _dotted(mutated), err)
        assert _related(PROBLEM.match(problems[0]).group("path"), mutated), (kind, _dotted(mutated), err)
        # the same recipe never leaves a trace in a run directory, new or existing
        fresh, existing = Path(tmp) / "new-run", Path(tmp) / "old-run"
        existing.mkdir()
        (existing / "metrics.jsonl").write_text("{}\n")
        assert _call(["run", str(path), "--run-dir", str(fresh), "--no-progress"])[0] == 2
        assert _call(["run", str(path), "--run-dir", str(existing), "--overwrite", "--no-progress"])[0] == 2
        assert not fresh.exists()
        assert [p.name for p in existing.iterdir()] == ["metrics.jsonl"]
        assert (existing / "metrics.jsonl").read_text() == "{}\n"
