from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdmrl import options as opts


@dataclass
class Inner:
    lr: float = field(default=1e-3, metadata={"min_exclusive": 0.0})


@dataclass
class Outer:
    name: str = field(metadata={"doc": "required"})
    steps: int = field(default=4, metadata={"min": 1})
    mode: str = field(default="a", metadata={"choices": ["a", "b"]})
    ratio: float | None = None
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def build(table):
    problems = []
    out = opts.build(Outer, table, "", problems)
    return out, problems


def test_valid_table_builds_with_defaults():
    out, problems = build({"name": "x", "inner": {"lr": 2}})
    assert problems == []
    assert out.steps == 4 and out.inner.lr == 2.0 and isinstance(out.inner.lr, float)


def test_every_problem_is_reported_with_its_path():
    _, problems = build({"steps": 0, "mode": "c", "inner": {"lr": -1, "typo": 1}, "ratio": "x", "extra": 1})
    joined = "\n".join(problems)
    assert "name: required, missing" in joined
    assert "steps: 0 is below the minimum 1" in joined
    assert "mode: 'c' is not allowed; choose one of: a, b" in joined
    assert "inner.lr: -1.0 must be greater than 0.0" in joined
    assert "inner.typo: unknown key; allowed keys here: lr" in joined
    assert "ratio: expected float or none, got string 'x'" in joined
    assert "extra: unknown key" in joined
    assert len(problems) == 7


def test_bool_is_not_an_int_and_int_is_a_float():
    _, problems = build({"name": "x", "steps": True})
    assert problems == ["steps: expected int, got boolean true"]
    out, problems = build({"name": "x", "ratio": 1})
    assert problems == [] and out.ratio == 1.0


def test_list_items_are_checked_with_index():
    _, problems = build({"name": "x", "tags": ["a", 3]})
    assert problems == ["tags[1]: expected str, got int 3"]


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=-5, max_value=5))
def test_range_check_matches_the_bound(steps):
    _, problems = build({"name": "x", "steps": steps})
    assert (problems == []) == (steps >= 1)


def test_describe_lists_fields_and_constraints():
    rows = {r["name"]: r for r in opts.describe(Outer)}
    assert rows["steps"]["constraint"] == ">= 1"
    assert rows["mode"]["constraint"] == "one of a, b"
    assert rows["name"]["default"] == "required"
    assert rows["inner"]["nested"] is Inner


def test_to_dict_round_trips():
    out, _ = build({"name": "x", "tags": ["q"], "inner": {"lr": 0.5}})
    again, problems = build(opts.to_dict(out))
    assert problems == [] and again == out


@pytest.mark.parametrize("value", [[1], {"a": 1}, "s", 1.5])
def test_wrong_type_for_int(value):
    _, problems = build({"name": "x", "steps": value})
    assert len(problems) == 1 and problems[0].startswith("steps: expected int")
