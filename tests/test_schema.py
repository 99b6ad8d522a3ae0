"""`mdmrl schema`: the JSON Schema of recipes, generated from the option classes.

Every shipped recipe validates against it and a sample of bad recipes does not, each
refused by `mdmrl validate` as well. The schema is checked with the small draft-4
validator below, which refuses any keyword it does not implement, so the schema can
only use what is checked here."""

import json
import re
from pathlib import Path

import pytest
import tomllib

from mdmrl.cli import main
from mdmrl.docgen import recipe_schema

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))
ANNOTATIONS = {"$schema", "title", "description", "default", "definitions"}
TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _same(a, b) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def schema_errors(schema: dict, value, root: dict, path: str = "$") -> list[str]:
    """The draft-4 keywords the generator uses; anything else is a test failure."""
    known = ANNOTATIONS | {
        "$ref", "type", "properties", "additionalProperties", "required", "enum", "items",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "allOf", "anyOf", "oneOf",
    }  # fmt: skip
    assert set(schema) <= known, f"keywords the test validator does not implement: {set(schema) - known}"
    if "$ref" in schema:
        assert schema["$ref"].startswith("#/definitions/"), schema["$ref"]
        return schema_errors(root["definitions"][schema["$ref"][len("#/definitions/") :]], value, root, path)
    if "type" in schema and not TYPES[schema["type"]](value):
        return [f"{path}: expected {schema['type']}, got {value!r}"]
    out = []
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    if TYPES["number"](value):
        if "minimum" in schema:
            low, strict = schema["minimum"], schema.get("exclusiveMinimum", False)
            if value < low or (strict and value == low):
                out.append(f"{path}: {value} below {low}")
        if "maximum" in schema:
            high, strict = schema["maximum"], schema.get("exclusiveMaximum", False)
            if value > high or (strict and value == high):
                out.append(f"{path}: {value} above {high}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                out += schema_errors(props[key], item, root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{path}.{key}: unknown key")
        out += [f"{path}.{key}: required" for key in schema.get("required", []) if key not in value]
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += schema_errors(schema["items"], item, root, f"{path}[{i}]")
    for sub in schema.get("allOf", []):
        out += schema_errors(sub, value, root, path)
    if "anyOf" in schema and all(schema_errors(s, value, root, path) for s in schema["anyOf"]):
        out.append(f"{path}: matches none of anyOf")
    if "oneOf" in schema:
        matched = [s for s in schema["oneOf"] if not schema_errors(s, value, root, path)]
        if len(matched) != 1:
            out.append(f"{path}: matches {len(matched)} of oneOf (exactly one needed)")
    return out


@pytest.fixture(scope="module")
def schema():
    return recipe_schema()


def test_the_schema_command_prints_the_schema(schema, capsys):
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(schema))
    assert printed["$schema"] == "http://json-schema.org/draft-04/schema#"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_validates_against_the_schema(schema, path):
    assert schema_errors(schema, tomllib.loads(path.read_text()), schema) == []


def _co_grpo() -> str:
    return (ROOT / "recipes/shapes/co_grpo.toml").read_text()


def _sub(old: str, new: str, text: str | None = None) -> str:
    text = _co_grpo() if text is None else text
    assert old in text, old
    return text.replace(old, new, 1)


REWARDS = '[[rewards]]\nname = "shapes-alignment"\nweight = 0.5\n'
BAD = {
    "unknown top-level key": _sub("seed = 0", "sede = 0"),
    "wrong type": _sub("seed = 0", 'seed = "zero"'),
    "out of range": _sub("lr = 1e-4", "lr = -1e-4"),
    "unknown choice": _sub('mode = "alternating"', 'mode = "both"'),
    "unknown key in a nested table": _sub("[train.model]\n", "[train.model]\nlearning_rate = 1\n"),
    "unknown backbone": _sub('name = "shapes-mdm"', 'name = "shapes-mdn"'),
    "reward entries as strings": re.sub(r"\[\[rewards\]\]\n(?:\w.*\n)*", "", _co_grpo()).replace(
        "seed = 0", 'seed = 0\nrewards = ["shapes-alignment", "shapes-quality"]'
    ),
    "reward entry without a name": _sub(REWARDS, "[[rewards]]\nweight = 0.5\n"),
    "unknown rewarder": _sub('name = "shapes-alignment"', 'name = "shapes-alignmnt"'),
    "unknown schedule as the base": _sub('base = "meissonic"', 'base = "meisonic"'),
    "learned schedule as the base": _sub('base = "meissonic"', 'base = "gaussian"'),
    "negative value in base_options": _sub(
        "base_options = { cfg_scale = 1.0 }", "base_options = { cfg_scale = -1.0 }"
    ),
    "string in base_options": _sub(
        "base_options = { cfg_scale = 1.0 }", 'base_options = { cfg_scale = "1" }'
    ),
    "unknown key in base_options": _sub("base_options = { cfg_scale = 1.0 }", "base_options = { cfg = 1.0 }"),
    "base_options of another schedule": _sub('base = "meissonic"', 'base = "amused"'),
    "negative guidance in the reference's options": _sub(
        "options = { cfg_scale = 3.0 }", "options = { cfg_scale = -3.0 }"
    ),
    "learned schedule as the reference": _sub(
        '[eval.reference]\nname = "meissonic"', '[eval.reference]\nname = "gaussian"'
    ),
    "unknown key in an objective's options": _sub("clip_eps = 0.2", "clip = 0.2"),
    "an array where a table belongs": _sub("options = { cfg_scale = 3.0 }", "options = [3.0]"),
    "a table where an array belongs": _sub("steps = [8]", "steps = { t = 8 }"),
    "missing required table": _sub('[backbone]\nname = "shapes-mdm"\n', ""),
    "pretraining option out of range": (ROOT / "recipes/shapes/pretrain.toml")
    .read_text()
    .replace("steps = 10000", "steps = 0"),
    "pretraining recipe with a training table": (ROOT / "recipes/shapes/pretrain.toml").read_text()
    + '\n[backbone]\nname = "shapes-mdm"\n',
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_schema_rejects_bad_recipes_that_validate_rejects(schema, tmp_path, capsys, case):
    text = BAD[case]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:  # a transform that breaks the TOML itself is a bug of this test
        pytest.fail(f"{case}: not TOML")
    assert schema_errors(schema, data, schema), f"{case}: the schema accepts it"
    path = tmp_path / "r.toml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2, case
    assert capsys.readouterr().err.startswith("mdmrl: error: ")


def test_plugin_options_and_constraints_reach_the_schema(schema):
    defs = schema["definitions"]
    gaussian = defs["mdmrl_plugins.cogrpo.gaussian.GaussianOptions"]
    assert "gaussian" not in gaussian["properties"]["base"]["enum"]  # only fixed schedules
    assert {"meissonic", "amused"} <= set(gaussian["properties"]["base"]["enum"])
    lr = defs["mdmrl.recipe.OptimSpec"]["properties"]["lr"]
    assert lr["minimum"] == 0.0 and lr["exclusiveMinimum"] is True and lr["type"] == "number"
    assert all(isinstance(d, dict) and d.get("type") == "object" for d in defs.values())
    # a part's options are selected by its name: the branch of each registered rewarder
    branches = defs["mdmrl.recipe.RewardSpec"]["allOf"][0]["oneOf"]
    assert {b["properties"]["name"]["enum"][0] for b in branches} == set(
        defs["mdmrl.recipe.RewardSpec"]["properties"]["name"]["enum"]
    )
