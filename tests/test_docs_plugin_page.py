"""docs/writing-plugins.md runs: its code blocks, each with its own imports, are
assembled into a package, installed into a temporary folder (found through its entry
point, as a user's package is) and used by a short training run; the page's package is
the one in examples/."""

import ast
import builtins
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "writing-plugins.md"
EXAMPLE = ROOT / "examples" / "mdmrl-example-reward"
BLOCK = re.compile(r"(?:^`(?P<file>[^`\n]+)`:\n\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.S | re.M)

#: A tiny training recipe; the page's [[rewards]] block is appended to it.
BASE = """\
# mdmrl run (tests/test_docs_plugin_page.py)
device = "cpu"
[backbone]
name = "shapes-mdm"
[schedule]
name = "meissonic"
[sampler]
name = "confidence"
steps = 2
[objective]
name = "grpo"
[prompts.train]
name = "shapes-train"
[train]
mode = "naive"
iterations = 2
rollout_batch = 4
[train.model]
group_size = 2
batch_size = 4
[eval]
steps = [2]
seeds = 1
max_prompts = 2
[logging]
tensorboard = false
image_every = 0
kl_every = 0
"""


def blocks(lang: str) -> list[re.Match]:
    return [m for m in BLOCK.finditer(PAGE.read_text()) if m["lang"] == lang]


def python_blocks() -> list[str]:
    return [m["body"] for m in blocks("python")]


def test_every_python_block_shows_its_imports():
    """A name a block uses is imported or defined in that block, defined by an earlier
    block of the page (the package's own classes), or a builtin."""
    earlier: set[str] = set()
    assert len(python_blocks()) >= 3
    for i, body in enumerate(python_blocks()):
        tree = ast.parse(body)
        bound = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                bound.add(node.name)
                bound |= {a.arg for a in node.args.args} if isinstance(node, ast.FunctionDef) else set()
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        missing = used - bound - earlier - set(dir(builtins))
        assert not missing, f"block {i + 1} of {PAGE.name} uses {sorted(missing)} without importing them"
        earlier |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def _definitions(source: str) -> dict[str, str]:
    tree = ast.parse(source)
    return {n.name: ast.unparse(n) for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}


def test_the_page_is_the_example_package():
    (pyproject,) = [m for m in blocks("toml") if m["file"]]
    assert pyproject["file"] == "examples/mdmrl-example-reward/pyproject.toml"
    assert pyproject["body"] == (EXAMPLE / "pyproject.toml").read_text()
    page = _definitions("\n\n".join(python_blocks()))
    example = _definitions((EXAMPLE / "mdmrl_example_reward" / "__init__.py").read_text())
    assert page == example


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The page's blocks as a package (pyproject.toml and the module of sections 2-4),
    installed with pip into a folder of its own."""
    tmp = tmp_path_factory.mktemp("page")
    pkg = tmp / "pkg"
    (pkg / "mdmrl_example_reward").mkdir(parents=True)
    (pyproject,) = [m for m in blocks("toml") if m["file"]]
    (pkg / "pyproject.toml").write_text(pyproject["body"])
    (pkg / "mdmrl_example_reward" / "__init__.py").write_text("\n\n".join(python_blocks()))
    site = tmp / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(site), str(pkg)], check=True, capture_output=True, text=True)
    env = {**os.environ, "PYTHONPATH": str(site), "MDMRL_LOAD_PLUGINS": "example-reward,shapes,cogrpo"}
    return tmp, env


def _mdmrl(env, *args):
    return subprocess.run([sys.executable, "-m", "mdmrl", *args], env=env, capture_output=True, text=True)


def _recipe(tmp: Path, rewards: str) -> Path:
    path = tmp / "recipe.toml"
    path.write_text(BASE + "\n" + rewards)
    return path


def test_the_page_package_is_discovered_and_trains(installed):
    tmp, env = installed
    listed = _mdmrl(env, "plugins")
    assert listed.returncode == 0, listed.stderr
    rows = {x.split()[0]: x.split() for x in listed.stdout.splitlines()}
    for name in ("brightness", "threshold"):
        assert rows[name] == [name, "rewarder", "example-reward", "mdmrl-example-reward", "0.1.0"]
    rewards = next(m["body"] for m in blocks("toml") if not m["file"] and "[[rewards]]" in m["body"])
    recipe = _recipe(tmp, rewards)
    run_dir = tmp / "run"
    done = _mdmrl(env, "run", str(recipe), "--run-dir", str(run_dir), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mdmrl: plan: 2 iterations: naive mode (model only)" in done.stderr
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for row in metrics:
        assert 0.0 <= row["reward/brightness_mean"] <= 1.0
        # four images per iteration, each 0 or 1: the share that reached the threshold
        assert row["reward/threshold_mean"] * 4 == pytest.approx(round(row["reward/threshold_mean"] * 4))


def test_the_nested_options_are_validated_as_the_page_says(installed):
    tmp, env = installed
    rewards = next(m["body"] for m in blocks("toml") if not m["file"] and "[[rewards]]" in m["body"])
    bad = _recipe(
        tmp, rewards.replace("reward_options = { target = 0.3 }", "reward_options = { target = 2.0 }")
    )
    out = _mdmrl(env, "validate", str(bad))
    message = "rewards[1].options.reward_options.target: 2.0 is above the maximum 1.0"
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert message in " ".join(PAGE.read_text().split())  # the page quotes the real message
    schema = json.loads(_mdmrl(env, "schema").stdout)
    assert "threshold" in schema["definitions"]["mdmrl.recipe.RewardSpec"]["properties"]["name"]["enum"]
    threshold = schema["definitions"]["mdmrl_example_reward.ThresholdOptions"]
    assert {"brightness", "threshold"} <= set(threshold["properties"]["reward"]["enum"])
