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


def test_non_finite_numbers_are_refused():
    _, problems = build({"name": "x", "ratio": float("nan"), "inner": {"lr": float("inf")}})
    assert problems == [
        "ratio: must be a finite number, got nan",
        "inner.lr: must be a finite number, got inf",
    ]


# -- options that hold another plug-in's options (the toy registry: tests/toy_plugin.py)
def _fixed(cls):
    return "is learned; a fixed one is needed" if getattr(cls, "stochastic", False) else None


@dataclass
class Wrapper:
    """A plug-in option table that names a rewarder and holds its options."""

    inner: str = opts.plugin_name("rewarder", "toy-count", doc="the wrapped rewarder")
    inner_options: dict = opts.plugin_options("inner", doc="its options")
    schedule: str = opts.plugin_name("schedule", "toy-cosine", accept=_fixed)
    scale: float = field(
        default=1.0,
        metadata={"no_effect": lambda w: "with inner = toy-nan" if w.inner == "toy-nan" else None},
    )


Part = opts.plugin_table("Part", "rewarder")


@dataclass
class Holder:
    wrapped: Wrapper = field(default_factory=Wrapper)
    parts: list[Part] = field(default_factory=list)


def build_holder(table):
    problems, built = [], {}
    out = opts.build(Holder, table, "h", problems, built)
    return out, problems, built


def test_nested_plugin_options_are_validated_by_the_named_plugin(toy_registry):
    out, problems, built = build_holder({"wrapped": {"inner_options": {"target": 2}}})
    assert problems == [] and out.wrapped.inner_options == {"target": 2}
    assert built["h.wrapped.inner_options"].target == 2  # the plug-in's own Options, built
    _, problems, _ = build_holder({"wrapped": {"inner_options": {"target": -1, "tagret": 1}}})
    assert problems == [
        "h.wrapped.inner_options.tagret: unknown key; allowed keys here: target",
        "h.wrapped.inner_options.target: -1 is below the minimum 0",
    ]
    # the default name's options are checked too; a plug-in without options refuses any key
    _, problems, _ = build_holder({"wrapped": {"inner": "toy-nan", "inner_options": {"target": 1}}})
    assert problems == ["h.wrapped.inner_options.target: unknown key; allowed keys here: (none)"]


def test_unknown_or_refused_plugin_names_list_what_is_allowed(toy_registry):
    _, problems, _ = build_holder({"wrapped": {"inner": "toy-cont", "inner_options": {"x": 1}}})
    assert problems == ["h.wrapped.inner: Unknown rewarder 'toy-cont'. Available: toy-count, toy-nan."]
    _, problems, _ = build_holder({"wrapped": {"schedule": "toy-learned"}})
    assert problems == ["h.wrapped.schedule: 'toy-learned' is learned; a fixed one is needed"]
    _, problems, _ = build_holder({"wrapped": {"schedule": "nope"}})
    assert problems == ["h.wrapped.schedule: Unknown schedule 'nope'. Available: toy-cosine."]


def test_plugin_tables_in_a_list_are_each_validated(toy_registry):
    out, problems, built = build_holder({"parts": [{"name": "toy-count", "options": {"target": 3}}]})
    assert problems == [] and built["h.parts[0].options"].target == 3
    _, problems, _ = build_holder(
        {"parts": [{"name": "toy-count", "options": {"target": "3"}}, "toy-nan", {}]}
    )
    assert problems == [
        "h.parts[0].options.target: expected int, got string '3'",
        "h.parts[1]: expected a table, got string 'toy-nan'",
        "h.parts[2].name: required, missing",
    ]


def test_a_written_key_without_effect_is_an_error_a_default_is_not(toy_registry):
    _, problems, _ = build_holder({"wrapped": {"inner": "toy-nan"}})
    assert problems == []
    _, problems, _ = build_holder({"wrapped": {"inner": "toy-nan", "scale": 2.0}})
    assert problems == ["h.wrapped.scale: has no effect with inner = toy-nan; remove it"]
    assert opts.ineffective(Holder, {"wrapped": {"inner": "toy-nan", "scale": 2.0}}) == ["wrapped.scale"]
    out, _, _ = build_holder({"wrapped": {"inner": "toy-nan"}})
    assert "scale" not in opts.to_dict(out.wrapped, effective=True)
    assert opts.to_dict(out.wrapped)["scale"] == 1.0


@dataclass
class Batch:
    size: int = 4
    group: int = 2

    def check_options(self):
        return (
            [f"size: {self.size} is not a multiple of group {self.group}"] if self.size % self.group else []
        )


@dataclass
class Phases:
    model: Batch = field(default_factory=Batch)


def test_check_options_runs_at_every_depth_unless_a_field_of_the_table_failed():
    problems = []
    opts.build(Phases, {"model": {"size": 5}}, "train", problems)
    assert problems == ["train.model.size: 5 is not a multiple of group 2"]
    problems = []
    opts.build(Phases, {"model": {"size": 5, "group": "two"}}, "train", problems)
    assert problems == ["train.model.group: expected int, got string 'two'"]


def test_json_schema_of_an_options_class(toy_registry):
    defs = {}
    ref = opts.json_schema(Holder, defs)
    holder = defs[ref["$ref"].split("/")[-1]]
    wrapper = defs[holder["properties"]["wrapped"]["allOf"][0]["$ref"].split("/")[-1]]
    assert wrapper["additionalProperties"] is False
    assert wrapper["properties"]["inner"]["enum"] == ["toy-count", "toy-nan"]
    assert wrapper["properties"]["schedule"]["enum"] == ["toy-cosine"]
    branches = wrapper["allOf"][0]["oneOf"]
    count = next(b for b in branches if b["properties"]["inner"]["enum"] == ["toy-count"])
    assert "required" not in count  # the default name: the branch applies when `inner` is left out
    target = defs[count["properties"]["inner_options"]["$ref"].split("/")[-1]]
    assert target["properties"]["target"] == {
        "type": "integer",
        "minimum": 0,
        "description": "token id that scores 1",
        "default": 0,
    }


def test_effective_overrides_keep_only_what_the_recipe_mode_uses():
    """Scripts that size recipes of several modes with one list (benchmarks/_runs.py)."""
    from pathlib import Path

    import tomllib

    from mdmrl import recipe as rc

    shapes = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    sizing = ["train.iterations=4", "train.cycles=2", "train.schedule.lr=0.1", "train.model.lr=0.1", "seed=1"]
    naive = tomllib.loads((shapes / "naive_grpo.toml").read_text())
    assert rc.effective_overrides(naive, sizing) == ["train.iterations=4", "train.model.lr=0.1", "seed=1"]
    alternating = tomllib.loads((shapes / "co_grpo.toml").read_text())
    kept = rc.effective_overrides(alternating, sizing)
    assert kept == ["train.cycles=2", "train.schedule.lr=0.1", "train.model.lr=0.1", "seed=1"]
    assert rc.effective_overrides(alternating, [*sizing, "train.mode=naive"])[0] == "train.iterations=4"


def test_several_unknown_keys_of_one_table_are_one_problem():
    # e.g. a plug-in table whose name was left out: its options meet the default's fields
    _, problems = build({"name": "x", "inner": {"typo": 1, "other": 2}})
    assert problems == ["inner: unknown keys typo, other; allowed keys here: lr"]
    _, problems = build({"name": "x", "sede": 1, "stepz": 2})  # at the top level: the first key's path
    assert problems == [
        "sede: unknown keys sede, stepz; allowed keys here: name, steps, mode, ratio, tags, inner"
    ]
