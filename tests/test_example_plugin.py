"""The worked third-party plug-in in examples/ is installed, discovered, listed and
usable from a recipe, exactly as a user's package would be."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "mdmrl-example-reward"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


def _env(target):
    return {**os.environ, "PYTHONPATH": str(target), "MDMRL_LOAD_PLUGINS": "example-reward,shapes,cogrpo"}


def test_listed_with_its_distribution(installed):
    out = subprocess.run(
        [sys.executable, "-m", "mdmrl", "plugins"],
        env=_env(installed),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("brightness"))
    assert line.split() == ["brightness", "rewarder", "example-reward", "mdmrl-example-reward", "0.1.0"]


def test_usable_from_a_recipe(installed):
    code = f"""
import sys, torch
sys.path.insert(0, {str(installed)!r})
from mdmrl.plugins import get_registry
from mdmrl.recipe import validate
from mdmrl.build import build_part
from mdmrl.interfaces import BuildContext, GeneratedBatch
raw = {{"rewards": [{{"name": "brightness", "weight": 1.0, "options": {{"target": 0.25}}}}]}}
reg = get_registry().get("rewarder", "brightness")
from mdmrl import options as opts
problems = []
o = opts.build(reg.cls.Options, {{"target": 0.25}}, "rewards[0].options", problems)
assert problems == [], problems
bad = []
opts.build(reg.cls.Options, {{"target": 2.0}}, "rewards[0].options", bad)
assert bad == ["rewards[0].options.target: 2.0 is above the maximum 1.0"], bad
r = reg.cls.from_options(o, BuildContext())
imgs = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 1.0)])
s = r.score(GeneratedBatch(["a", "b"], torch.zeros(2, 16, dtype=torch.long), (4, 4), lambda t: imgs))
assert torch.allclose(s, torch.tensor([1.0, 0.25])), s
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], env=_env(installed), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_recipe_naming_it_validates_only_when_installed(installed, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "tests" / "data" / "brightness.toml").read_text())
    ok = subprocess.run(
        [sys.executable, "-m", "mdmrl", "validate", str(recipe)],
        env=_env(installed),
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    env = _env(installed)
    env["PYTHONPATH"] = ""
    missing = subprocess.run(
        [sys.executable, "-m", "mdmrl", "validate", str(recipe)], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "Unknown rewarder 'brightness'" in missing.stderr
