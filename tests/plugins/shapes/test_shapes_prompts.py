"""Prompt sources of the shapes world: reproducible training draws, a fixed held-out list."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdmrl import options as opt_schema
from mdmrl.cli import main
from mdmrl.errors import UserError
from mdmrl.evaluate import read_prompt_file
from mdmrl.interfaces import BuildContext
from mdmrl.plugins import get_registry
from mdmrl_plugins.shapes.grammar import ALIASES, FAMILIES, family_prompts, is_heldout, parse, words_of
from mdmrl_plugins.shapes.prompts import ShapesHeldoutPrompts, ShapesPromptOptions, ShapesTrainPrompts


def build(name: str, table: dict | None = None):
    reg = get_registry().get("prompts", name)
    problems: list[str] = []
    options = opt_schema.build(reg.cls.Options, table or {}, "prompts.train.options", problems)
    assert not problems, problems
    return reg.cls.from_options(options, BuildContext())


def test_sources_are_registered():
    assert get_registry().get("prompts", "shapes-train").cls is ShapesTrainPrompts
    assert get_registry().get("prompts", "shapes-heldout").cls is ShapesHeldoutPrompts


def test_train_draws_depend_only_on_the_generator():
    src = build("shapes-train")
    a = src.sample(24, torch.Generator().manual_seed(11))
    np.random.seed(0)
    torch.manual_seed(0)  # global state is not used
    b = src.sample(24, torch.Generator().manual_seed(11))
    c = src.sample(24, torch.Generator().manual_seed(12))
    assert a == b and a != c
    assert all(not is_heldout(parse(p)) for p in a)


def test_train_draws_resume_from_a_saved_generator_state():
    src = build("shapes-train")
    g = torch.Generator().manual_seed(5)
    src.sample(8, g)
    state = g.get_state()
    expected = [src.sample(8, g) for _ in range(3)]
    g2 = torch.Generator()
    g2.set_state(state)
    assert [src.sample(8, g2) for _ in range(3)] == expected


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_train_draws_are_family_balanced(n, seed):
    prompts = build("shapes-train").sample(n, torch.Generator().manual_seed(seed))
    assert len(prompts) == n
    counts = Counter(parse(p).family for p in prompts)
    assert set(counts) <= set(FAMILIES)
    if n >= len(FAMILIES):
        assert set(counts) == set(FAMILIES)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_heldout_evaluation_is_fixed_ordered_balanced_and_heldout():
    src = build("shapes-heldout")
    ev = src.evaluation()
    assert len(ev) == 60
    assert ev == build("shapes-heldout").evaluation()  # the same list every time
    assert [parse(p).family for p in ev[:12]] == list(FAMILIES) * 2
    assert Counter(parse(p).family for p in ev) == {f: 10 for f in FAMILIES}
    assert all(is_heldout(parse(p)) for p in ev)
    # each family walks through its pool before repeating a prompt
    assert len(set(ev)) == sum(min(10, len(family_prompts(f, "heldout"))) for f in FAMILIES)
    other = build("shapes-heldout", {"seed": 99}).evaluation()
    assert other != ev and Counter(parse(p).family for p in other) == Counter(parse(p).family for p in ev)


def test_train_and_heldout_lists_are_disjoint():
    train = build("shapes-train", {"count": 600})
    held = build("shapes-heldout", {"count": 600})
    train_prompts = set(train.evaluation()) | set(train.sample(600, torch.Generator().manual_seed(0)))
    held_prompts = set(held.evaluation()) | set(held.sample(600, torch.Generator().manual_seed(0)))
    assert not train_prompts & held_prompts
    assert all(not is_heldout(parse(p)) for p in train_prompts)


def test_families_option_restricts_draws_and_evaluation():
    src = build("shapes-heldout", {"families": ["position", "counting"], "count": 7})
    ev = src.evaluation()
    assert [parse(p).family for p in ev] == ["counting", "position"] * 3 + ["counting"]
    draws = src.sample(20, torch.Generator().manual_seed(3))
    assert {parse(p).family for p in draws} == {"counting", "position"}


def test_recipe_validation_rejects_unknown_families_and_small_counts():
    problems: list[str] = []
    opt_schema.build(
        ShapesPromptOptions, {"families": ["colours"], "count": 3}, "prompts.eval.options", problems
    )
    assert any("families" in p and "colours" in p for p in problems)
    assert any("count" in p for p in problems)


@pytest.mark.parametrize(
    "options, match",
    [
        (ShapesPromptOptions(families=["colours"]), "colours"),
        (ShapesPromptOptions(families=[]), "empty"),
        (ShapesPromptOptions(families=["colors", "colors"]), "twice"),
        (ShapesPromptOptions(count=2), "count"),
    ],
)
def test_from_options_rejects_bad_options(options, match):
    with pytest.raises(UserError, match=match):
        ShapesHeldoutPrompts.from_options(options, BuildContext())


def test_categorize_gives_the_family_of_each_prompt_and_infers_one_for_any_other():
    from mdmrl_plugins.shapes.prompts import ShapesHeldoutPrompts

    src = ShapesHeldoutPrompts()
    prompts = src.evaluation()
    cats = src.categorize(prompts)
    assert set(cats) == {"single_object", "two_objects", "counting", "colors", "position", "color_attr"}
    assert src.categorize(["A red circle", "three triangles", "a circle to the left of a square"]) == [
        "colors",
        "counting",
        "position",
    ]
    assert src.categorize(["two red circles", "One blue triangle.", "a red circle above a blue square"]) == [
        "counting",
        "colors",
        "position",
    ]
    with pytest.raises(UserError, match="did you mean 'a circle'"):
        src.categorize(["a circl"])


PLAIN_FILE = Path(__file__).resolve().parents[3] / "recipes" / "prompts" / "shapes_plain.txt"
PLAIN_CATEGORIES = {
    "single_object": ["A triangle.", "One square", "the circle", "1 triangle"],
    "two_objects": ["A circle and a square.", "one triangle and one circle", "The square and the triangle"],
    "counting": [
        "3 squares",
        "Two triangles.",
        "4 circles",
        "2 red circles",
        "three blue squares!",
        "one circle and 2 triangles",
    ],
    "colors": ["One blue triangle", "a red circle.", "The green square", "an orange circle"],
    "position": [
        "A circle left of a square.",
        "a triangle to the left of a circle",
        "a square on top of a triangle",
        "A circle under a triangle",
        "a triangle beneath a square",
        "a square right of a circle",
        "a circle on the left of a triangle",
        "The triangle on the right of the square.",
        "a square over a circle",
        "a circle underneath a square",
        "a blue circle left of a red square",
        "the yellow triangle above the white circle",
    ],
    "color_attr": [
        "A red circle and a blue square.",
        "one green triangle and one purple circle",
        "a white square and an orange triangle",
        "a red circle and a blue circle",
        "a yellow square and a triangle",
    ],
}


def test_the_shipped_plain_english_file_gets_the_expected_categories():
    prompts, cats = read_prompt_file(str(PLAIN_FILE), ShapesHeldoutPrompts().categorize)
    expected = {p: c for c, ps in PLAIN_CATEGORIES.items() for p in ps}
    assert dict(zip(prompts, cats)) == expected and len(prompts) == len(expected)
    # the file uses every accepted phrasing
    words = " " + " ".join(" ".join(words_of(p)) for p in prompts) + " "
    assert [alias for alias in ALIASES if f" {alias} " not in words] == []


def test_eval_infers_categories_of_a_plain_prompt_file(tmp_path, capsys):
    lines = ["# plain sentences", "One blue triangle.", "", "3 squares", "a circle left of a square"]
    path = tmp_path / "plain.txt"
    path.write_text("\n".join(lines) + "\n")
    recipe = str(Path(__file__).resolve().parents[3] / "recipes" / "shapes" / "co_grpo.toml")
    assert main(["eval", recipe, "--prompts", str(path), "--seeds", "1", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| colors |" in out and "| counting |" in out and "| position |" in out
    assert "| other |" not in out and "shapes-clean" in out


def test_a_line_outside_the_grammar_names_file_line_and_nearest_form(tmp_path, capsys):
    path = tmp_path / "plain.txt"
    path.write_text("# plain sentences\none blue triangle\n\na circle lft of a square\n")
    recipe = str(Path(__file__).resolve().parents[3] / "recipes" / "shapes" / "co_grpo.toml")
    assert main(["eval", recipe, "--prompts", str(path), "--seeds", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"{path}, line 4:" in err and "did you mean 'a circle left of a square'?" in err
    # a category column does not skip the check
    path.write_text("colors\ta blue triangel\n")
    with pytest.raises(UserError, match=r"line 1: .*did you mean 'a blue triangle'\?"):
        read_prompt_file(str(path), ShapesHeldoutPrompts().categorize)
