"""The shapes caption grammar: parsing, round trips, errors and the held-out split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdmrl.errors import UserError
from mdmrl_plugins.shapes import grammar
from mdmrl_plugins.shapes.grammar import (
    FAMILIES,
    VOCABULARY,
    ObjectPhrase,
    Requirements,
    atoms,
    family_prompts,
    is_heldout,
    parse,
    sample_prompt,
)

EXAMPLES = {
    "a circle": ("single_object", Requirements((ObjectPhrase("circle"),))),
    "a circle and a square": (
        "two_objects",
        Requirements((ObjectPhrase("circle"), ObjectPhrase("square"))),
    ),
    "three triangles": ("counting", Requirements((ObjectPhrase("triangle", None, 3),))),
    "a red circle": ("colors", Requirements((ObjectPhrase("circle", "red"),))),
    "an orange square": ("colors", Requirements((ObjectPhrase("square", "orange"),))),
    "a circle to the left of a square": (
        "position",
        Requirements((ObjectPhrase("circle"), ObjectPhrase("square")), "left"),
    ),
    "a circle to the right of a square": (
        "position",
        Requirements((ObjectPhrase("circle"), ObjectPhrase("square")), "right"),
    ),
    "a triangle above a circle": (
        "position",
        Requirements((ObjectPhrase("triangle"), ObjectPhrase("circle")), "above"),
    ),
    "a triangle below a circle": (
        "position",
        Requirements((ObjectPhrase("triangle"), ObjectPhrase("circle")), "below"),
    ),
    "a red circle and a blue square": (
        "color_attr",
        Requirements((ObjectPhrase("circle", "red"), ObjectPhrase("square", "blue"))),
    ),
}


@pytest.mark.parametrize("prompt", sorted(EXAMPLES))
def test_family_examples_parse_to_their_requirements(prompt):
    family, expected = EXAMPLES[prompt]
    req = parse(prompt)
    assert req == expected
    assert req.family == family
    assert req.text() == prompt


def test_every_family_has_an_example():
    assert {f for f, _ in EXAMPLES.values()} == set(FAMILIES)


def test_general_grammar_prompts_outside_the_families():
    req = parse("two red circles and a blue square")
    assert req.objects == (ObjectPhrase("circle", "red", 2), ObjectPhrase("square", "blue", 1))
    assert req.family is None
    assert parse("a red circle and a square").family is None  # only one phrase coloured
    assert parse("a red circle above a blue square").relation == "above"
    assert parse("a red circle above a blue square").family is None
    assert parse("a circle above a circle").objects == (ObjectPhrase("circle"), ObjectPhrase("circle"))


def test_case_and_whitespace_are_ignored():
    assert parse("  A   Red\tCircle\n and  a BLUE square ") == parse("a red circle and a blue square")
    assert parse("a orange circle") == parse("an orange circle")  # either article is accepted


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "   ",
        "circle",
        "a circl",
        "a hexagon",
        "a red",
        "two circle",
        "a circles",
        "five circles",
        "a circle and",
        "a circle next to a square",
        "a circle and a circle",
        "a red circle and a red circle",
        "two circles to the left of a square",
        "a circle to the left a square",
        "a circle and a square and a triangle",
        "a background circle",
    ],
)
def test_prompts_outside_the_grammar_raise_user_error(prompt):
    with pytest.raises(UserError) as info:
        parse(prompt)
    msg = str(info.value)
    assert repr(prompt) in msg and "docs/shapes-world.md" in msg
    assert "\n" not in msg


def test_non_string_prompt_is_a_user_error():
    with pytest.raises(UserError):
        parse(None)  # type: ignore[arg-type]


def test_vocabulary_is_exactly_the_words_of_the_grammar():
    words = set()
    for f in FAMILIES:
        for p in family_prompts(f):
            words.update(p.split())
    assert set(VOCABULARY) == words  # every word is used by some family prompt, and no other
    assert all(w == w.lower() for w in VOCABULARY)
    assert list(VOCABULARY) == sorted(set(VOCABULARY))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    split=st.sampled_from(grammar.SPLITS),
    family=st.sampled_from([None, *FAMILIES]),
)
def test_sampled_prompts_round_trip(seed, split, family):
    prompt = sample_prompt(np.random.default_rng(seed), split, family)
    req = parse(prompt)
    assert req.text() == prompt
    assert parse(req.text()) == req
    assert set(prompt.split()) <= set(VOCABULARY)
    assert is_heldout(req) == (split == "heldout")
    if family is not None:
        assert req.family == family


@settings(max_examples=25, deadline=None)
@given(
    count=st.sampled_from([1, 2, 3, 4]),
    colour=st.sampled_from([None, *grammar.COLOUR_WORDS]),
    shape=st.sampled_from(grammar.SHAPES),
    other=st.sampled_from(grammar.SHAPES),
    joint=st.sampled_from([None, "and", *grammar.RELATIONS]),
)
def test_any_requirements_round_trip_through_text(count, colour, shape, other, joint):
    first = ObjectPhrase(shape, colour, count)
    if joint is None:
        req = Requirements((first,))
    elif joint == "and":
        if other == shape:
            return
        req = Requirements((first, ObjectPhrase(other)))
    else:
        req = Requirements((ObjectPhrase(shape, colour), ObjectPhrase(other)), joint)
    assert parse(req.text()) == req
    assert parse(req.text().upper()) == req


def test_family_pools_cover_the_families_and_split_disjointly():
    for f in FAMILIES:
        train, held = set(family_prompts(f, "train")), set(family_prompts(f, "heldout"))
        assert train and held, f
        assert not train & held
        assert train | held == set(family_prompts(f))
        assert all(parse(p).family == f for p in family_prompts(f))


def test_train_and_heldout_share_no_composition():
    train_atoms, held_atoms = set(), set()
    for f in FAMILIES:
        for p in family_prompts(f, "train"):
            train_atoms |= atoms(parse(p))
        for p in family_prompts(f, "heldout"):
            held = {a for a in atoms(parse(p)) if grammar._atom_heldout(a)}
            assert held, p  # every held-out prompt has a reserved composition
            held_atoms |= held
    assert not train_atoms & held_atoms


def test_heldout_rule_examples():
    assert is_heldout(parse("a red triangle"))  # reserved (colour, shape)
    assert not is_heldout(parse("a red square"))
    assert is_heldout(parse("a square to the right of a circle"))  # = circle left of square
    assert not is_heldout(parse("a square to the left of a circle"))
    assert is_heldout(parse("a triangle and a square")) and is_heldout(parse("a square and a triangle"))
    assert is_heldout(parse("four circles")) and not is_heldout(parse("four squares"))
    assert is_heldout(parse("a triangle")) and not is_heldout(parse("a circle"))
    assert is_heldout(parse("a blue circle and a red square"))  # contains blue circle


def test_sample_prompt_rejects_unknown_split_and_family():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        sample_prompt(rng, "test")
    with pytest.raises(ValueError):
        sample_prompt(rng, "train", "colours")
