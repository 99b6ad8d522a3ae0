"""Project-level checks: README's two commands, CI, packaging, docs, shipped recipes."""

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\n(.+?)\n```", setup, re.S)


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "mdmrl run recipes/shapes/co_grpo.toml" in cmds[0]
    assert "pytest" in cmds[1]
    assert (ROOT / "recipes" / "shapes" / "co_grpo.toml").is_file()


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci.splitlines()
    assert 'rc" -eq 5' in ci  # pytest's "no tests collected" is handled


def test_every_plugin_package_is_listed_in_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(py["tool"]["setuptools"]["packages"])
    found = {"mdmrl_plugins"} | {
        "mdmrl_plugins." + p.parent.relative_to(ROOT / "plugins").as_posix().replace("/", ".")
        for p in (ROOT / "plugins").rglob("__init__.py")
        if p.parent != ROOT / "plugins"
    }
    assert found <= listed, f"add to [tool.setuptools].packages: {sorted(found - listed)}"


def test_torch_and_torchvision_are_pinned_as_a_pair():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_recipe_reference_is_current():
    from mdmrl.docgen import recipe_reference

    committed = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert committed == recipe_reference(), "regenerate: python -m mdmrl.docgen > docs/recipe-reference.md"


RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    text = path.read_text()
    first = text.splitlines()[0]
    rel = path.relative_to(ROOT).as_posix()
    assert first.startswith("#") and rel in text.split("\n\n")[0], f"{rel}: header must show the command"
    if "[pretrain]" in text:
        from mdmrl.pretrain import load as load_pretrain

        load_pretrain(str(path), [])
    else:
        from mdmrl.recipe import load

        load(path)


def test_docs_pages_exist_and_are_linked():
    readme = (ROOT / "README.md").read_text()
    for page in (
        "architecture.md",
        "writing-plugins.md",
        "plugin-hooks.md",
        "recipe-reference.md",
        "install.md",
    ):
        assert (ROOT / "docs" / page).is_file(), page
        assert f"docs/{page}" in readme, page


def _sources():
    for base in ("mdmrl", "plugins"):
        yield from (ROOT / base).rglob("*.py")


def test_no_unrestricted_pickle_loads_and_no_remote_code_by_default():
    for path in _sources():
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1) or "allow_pickle" in text, (
                f"{path}: torch.load without weights_only"
            )
        assert "pickle.load" not in text, path
        assert "trust_remote_code=True" not in text, path
