"""Generate docs/recipe-reference.md from the recipe schema and the installed
plug-ins' option schemas: ``python -m mdmrl.docgen > docs/recipe-reference.md``.
A test fails when the committed page differs from the generated one."""

from __future__ import annotations

from mdmrl import options as opts
from mdmrl.interfaces import NoOptions
from mdmrl.recipe import Recipe

HEADER = """# Recipe reference

Generated from the schema by `python -m mdmrl.docgen > docs/recipe-reference.md`
(tests/test_docs.py checks it is current). Every key below is validated strictly:
an unknown key, a wrong type or a value out of range is an error, and all errors are
reported at once with their dotted path. Override any value from the command line with
`--set key.sub=value` (list items by index: `--set rewards.0.weight=0.3`).
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
            nested.append((key, r["nested"]))
    for key, cls_ in nested:
        out.append("")
        out.append(f"### `[{key}]`")
        out.append("")
        _table(cls_, key + ".", out)


def recipe_reference(include_plugins: bool = True) -> str:
    out = [HEADER, "## Top level", ""]
    _table(Recipe, "", out)
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


if __name__ == "__main__":
    print(recipe_reference(), end="")
