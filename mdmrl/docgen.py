"""Generate docs/recipe-reference.md from the recipe schema and the installed
plug-ins' option schemas: ``python -m mdmrl.docgen > docs/recipe-reference.md``.
A test fails when the committed page differs from the generated one."""

from __future__ import annotations

from mdmrl import options as opts
from mdmrl.interfaces import NoOptions
from mdmrl.recipe import PretrainRecipe, Recipe

HEADER = """# Recipe reference

Generated from the schema by `python -m mdmrl.docgen > docs/recipe-reference.md`
(tests/test_project.py checks it is current). Every key below is validated strictly,
at every depth (a part's `options`, and the options of a plug-in that an option names,
such as the `gaussian` schedule's `base_options`): an unknown key, a wrong type, a
non-finite number, a value out of range, an unknown plug-in name or a key that has no
effect in the chosen mode (`train.iterations` in the alternating mode, `train.cycles`
in the others, ...) is an error, and all errors are reported at once with their dotted
path. A key left out keeps its default and is never an error. Override any value from
the command line with `--set key.sub=value` (list items by index: `--set
rewards.0.weight=0.3`).

`mdmrl validate RECIPE` checks a training recipe (the kind `mdmrl run`, `mdmrl eval`
and `mdmrl sample` read) or a pretraining recipe (a `[pretrain]` table, for `mdmrl
pretrain`) without running it, and prints the run's plan, e.g. `72 iterations: 3
cycles × (16 model + 8 schedule)`; `mdmrl run` prints the same line before it starts.

## Checking recipes in an editor

`mdmrl schema` prints a JSON Schema (draft 4) of both recipe kinds, generated from the
same option classes, with the installed plug-ins' options: each part's `options` table
is checked against the schema of the plug-in its `name` selects. Editors that use the
Taplo TOML language server (VS Code's *Even Better TOML*, Zed, Helix, Neovim with
`taplo lsp`) then complete keys, show each key's meaning and mark mistakes as you type.
Write the schema once (again after installing a plug-in):

```
mdmrl schema > mdmrl-recipe.schema.json
```

and point recipes at it, either with a first line in a recipe (a path relative to the
recipe, or a URL)

```toml
#:schema ../../mdmrl-recipe.schema.json
```

or for every recipe at once with a `.taplo.toml` at the root of your project:

```toml
[[rule]]
include = ["recipes/**/*.toml"]
[rule.schema]
path = "mdmrl-recipe.schema.json"
```

The same file checks recipes on the command line: `taplo check --schema
file://$PWD/mdmrl-recipe.schema.json recipes/shapes/co_grpo.toml`. The schema covers
keys, types, ranges, choices and plug-in names; relations between keys (a batch that
is a multiple of the group size, keys without effect in the chosen mode, a negative
reward weight without `penalty = true`) are checked by `mdmrl validate`.
tests/test_schema.py validates every shipped recipe against it.
"""


def _table(cls: type, prefix: str, out: list[str]) -> None:
    rows = opts.describe(cls)
    nested = []
    out.append("| key | type | default | allowed | meaning |")
    out.append("|---|---|---|---|---|")
    for r in rows:
        key = f"{prefix}{r['name']}"
        out.append(f"| `{key}` | {r['type']} | `{r['default']}` | {r['constraint']} | {r['doc']} |")
        if r["nested"] is not None:
            nested.append((key, r["nested"], r["many"]))
    for key, cls_, many in nested:
        out.append("")
        out.append(f"### `[[{key}]]` (each entry)" if many else f"### `[{key}]`")
        out.append("")
        _table(cls_, key + ".", out)


def recipe_reference(include_plugins: bool = True) -> str:
    out = [HEADER, "## Top level", ""]
    _table(Recipe, "", out)
    out += ["", "## Pretraining recipes (`mdmrl pretrain`)", ""]
    _table(PretrainRecipe, "", out)
    if include_plugins:
        from mdmrl.plugins import get_registry

        reg = get_registry()
        out += [
            "",
            "## Plug-in options",
            "",
            "Each part's `options` table is validated by that plug-in's own `Options` schema.",
            "",
        ]
        for kind, entries in reg.parts.items():
            for name in sorted(entries):
                x = entries[name]
                out.append(f"### {kind} `{name}` ({x.distribution})")
                out.append("")
                doc = (x.cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
                if doc:
                    out += [doc, ""]
                if x.cls.Options is NoOptions or not opts.describe(x.cls.Options):
                    out += ["No options.", ""]
                    continue
                _table(x.cls.Options, "options.", out)
                out.append("")
    return "\n".join(out).rstrip() + "\n"


def recipe_schema() -> dict:
    """The JSON Schema of recipes (training and pretraining), generated from the same
    option classes that validate them, installed plug-ins included: ``mdmrl schema``.
    It checks keys, types, ranges, choices and plug-in names at every depth (each
    part's options by the schema of the plug-in its ``name`` selects); relations
    between fields (a batch that is a multiple of the group, keys without effect in
    the chosen mode) are left to ``mdmrl validate``."""
    definitions: dict = {}
    kinds = [opts.json_schema(Recipe, definitions), opts.json_schema(PretrainRecipe, definitions)]
    return {
        "$schema": opts.JSON_SCHEMA_DIALECT,
        "title": "mdmrl recipe",
        "description": "A training recipe (mdmrl run, eval, sample) or a pretraining recipe (mdmrl pretrain).",
        "oneOf": kinds,
        "definitions": definitions,
    }


if __name__ == "__main__":
    print(recipe_reference(), end="")
