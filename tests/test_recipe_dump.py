"""The run directory's recipe.toml is written by dump_toml and read back by tomllib:
any string a recipe can hold (newlines in a prompt template, quotes, backslashes,
tabs, non-ASCII) must survive the round trip."""

from __future__ import annotations

import tomllib
from hypothesis import given, settings
from hypothesis import strategies as st

from mdmrl.recipe import dump_toml


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=["Cs"]), max_size=40))
def test_strings_round_trip_through_the_saved_recipe(text):
    data = {
        "description": text,
        "backbone": {"name": "x", "options": {"template": text, "list": [text, "b"]}},
    }
    assert tomllib.loads(dump_toml(data)) == data


def test_a_multiline_template_round_trips():
    data = {"prompts": {"train": {"options": {"template": 'Question:\n{q}\n\tAnswer "here" \\ done'}}}}
    assert tomllib.loads(dump_toml(data)) == data
