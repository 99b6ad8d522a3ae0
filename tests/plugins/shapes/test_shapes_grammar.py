"""The shapes caption grammar: parsing, round trips, errors and the held-out split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
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


@st.composite
def requirements(draw) -> Requirements:
    """Any requirements of the grammar: one phrase, two joined by "and", or a relation."""
    first = ObjectPhrase(
        draw(st.sampled_from(grammar.SHAPES)),
        draw(st.sampled_from([None, *grammar.COLOUR_WORDS])),
        draw(st.sampled_from([1, 2, 3, 4])),
    )
    joint = draw(st.sampled_from([None, "and", *grammar.RELATIONS]))
    if joint is None:
        return Requirements((first,))
    second = ObjectPhrase(
        draw(st.sampled_from(grammar.SHAPES)), draw(st.sampled_from([None, *grammar.COLOUR_WORDS]))
    )
    if joint != "and":
        return Requirements((ObjectPhrase(first.shape, first.colour), second), joint)
    same_colour = first.colour is None or second.colour is None or first.colour == second.colour
    assume(first.shape != second.shape or not same_colour)
    return Requirements((first, second))


@settings(max_examples=25, deadline=None)
@given(req=requirements())
def test_any_requirements_round_trip_through_text(req):
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


PLAIN = {
    "one blue triangle": "a blue triangle",
    "One blue triangle.": "a blue triangle",
    "1 circle": "a circle",
    "the red square": "a red square",
    "3 squares": "three squares",
    "2 red circles!": "two red circles",
    "4 triangles?": "four triangles",
    "a blue circle left of a red square": "a blue circle to the left of a red square",
    "a circle on the left of the square": "a circle to the left of a square",
    "a square right of a circle": "a square to the right of a circle",
    "a square on the right of a circle.": "a square to the right of a circle",
    "a triangle on top of a circle": "a triangle above a circle",
    "a triangle over a circle": "a triangle above a circle",
    "a circle under a triangle": "a circle below a triangle",
    "a circle beneath a triangle": "a circle below a triangle",
    "a circle underneath the triangle": "a circle below a triangle",
    "one circle and 2 squares": "a circle and two squares",
    "A Red Circle And A Blue Square.": "a red circle and a blue square",
}


@pytest.mark.parametrize("plain", sorted(PLAIN))
def test_plain_english_phrasings_parse_like_their_canonical_form(plain):
    req = parse(plain)
    assert req == parse(PLAIN[plain])
    assert req.text() == PLAIN[plain]
    assert set(req.text().split()) <= set(VOCABULARY)
    assert grammar.canonical(plain) == PLAIN[plain]


def test_every_alias_is_used_by_an_example_and_stands_for_a_canonical_phrase():
    used = " " + " ".join(" ".join(grammar.words_of(p)) for p in PLAIN) + " "
    for alias, canon in grammar.ALIASES.items():
        assert f" {alias} " in used, alias
        assert set(canon.split()) <= set(VOCABULARY)
    assert grammar.canonical("a photo of a cat") is None


@settings(max_examples=40, deadline=None)
@given(
    req=requirements(),
    choice=st.randoms(use_true_random=False),
    tail=st.sampled_from(["", ".", "!", " ?"]),
    upper=st.booleans(),
)
def test_any_accepted_phrasing_parses_to_the_canonical_requirements(req, choice, tail, upper):
    # rewrite every canonical word or phrase that has aliases into one of them, at random
    synonyms: dict[str, list[str]] = {}
    for alias, canon in grammar.ALIASES.items():
        synonyms.setdefault(canon, [canon]).append(alias)
    text = req.text()
    for canon in sorted(synonyms, key=len, reverse=True):
        text = f" {text} ".replace(f" {canon} ", f" {choice.choice(synonyms[canon])} ").strip()
    # "an" is kept or becomes "a", "one", "1" or "the"
    text = f" {text} ".replace(" an ", f" {choice.choice(['an', 'a', 'one', '1', 'the'])} ").strip()
    text = (text.upper() if upper else text) + tail
    assert parse(text) == req
    assert parse(text).text() == req.text()


def test_category_is_the_family_for_family_prompts():
    for f in FAMILIES:
        assert {parse(p).category for p in family_prompts(f)} == {f}


@pytest.mark.parametrize(
    "prompt, category",
    [
        ("two red circles", "counting"),
        ("two circles and a square", "counting"),
        ("a red circle and two blue squares", "counting"),
        ("a red circle above a blue square", "position"),
        ("a red circle to the left of a square", "position"),
        ("a circle above a circle", "position"),
        ("a red circle and a square", "color_attr"),
        ("a circle and a blue square", "color_attr"),
        ("a red circle and a blue circle", "color_attr"),
        ("one triangle", "single_object"),
        ("the green square.", "colors"),
    ],
)
def test_category_of_prompts_outside_the_families(prompt, category):
    assert parse(prompt).category == category


@settings(max_examples=25, deadline=None)
@given(req=requirements())
def test_every_grammar_prompt_has_one_of_the_six_categories(req):
    assert req.category in FAMILIES
    if req.family is not None:
        assert req.category == req.family


@pytest.mark.parametrize(
    "prompt, suggestion",
    [
        ("a circl", "a circle"),
        ("two circle", "two circles"),
        ("five circles", "four circles"),
        ("a circle lft of a square", "a circle left of a square"),
        ("a circle to the left a square", "a circle to the left of a square"),
        ("a circle next to a square", "a circle left of a square"),
        ("a circle and", "a circle"),
    ],
)
def test_errors_name_the_nearest_accepted_form(prompt, suggestion):
    with pytest.raises(UserError) as info:
        parse(prompt)
    msg = str(info.value)
    assert f"did you mean {suggestion!r}?" in msg and "\n" not in msg
    parse(suggestion)  # the suggestion is accepted


def test_errors_without_a_one_edit_fix_list_what_was_expected():
    with pytest.raises(UserError) as info:
        parse("a photo of a cat")
    msg = str(info.value)
    assert "did you mean" not in msg and "expected a colour or a shape" in msg
