"""Registration of the MaskGRPO parts and a training iteration through the engine."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

import pytest
import torch

RECIPE = """\
# mdmrl run maskgrpo-test.toml
seed = 5
device = "cpu"
[backbone]
name = "tiny"
[schedule]
name = "toy-cosine"
[sampler]
name = "emerge"
steps = 3
[[rewards]]
name = "toy-count"
weight = 1.0
[objective]
name = "mask-grpo"
[objective.options]
mu = 2
gamma = 0.5
kl_beta = {beta}
[prompts.train]
name = "toy-prompts"
[train]
mode = "naive"
iterations = 2
[train.model]
lr = 0.05
group_size = 4
batch_size = 8
[logging]
image_every = 0
tensorboard = false
"""


@pytest.fixture
def registry(toy_registry):
    from mdmrl_plugins.maskgrpo import plugin

    toy_registry.register_plugin(plugin, "maskgrpo")
    return toy_registry


def test_hooks_register_the_objective_and_the_sampler(registry):
    from mdmrl_plugins.maskgrpo.emerge import EmergeSampler
    from mdmrl_plugins.maskgrpo.objective import MaskGRPOObjective

    assert registry.get("objective", "mask-grpo").cls is MaskGRPOObjective
    assert registry.get("sampler", "emerge").cls is EmergeSampler
    assert "mask-grpo" in registry.names("objective") and "emerge" in registry.names("sampler")
    assert not registry.errors


def test_entry_point_points_at_the_plugin_module():
    eps = {ep.name: ep.value for ep in md.entry_points(group="mdmrl")}
    assert eps.get("maskgrpo") == "mdmrl_plugins.maskgrpo.plugin"


def test_plugin_module_imports_nothing_heavy():
    code = (
        "import sys, mdmrl_plugins.maskgrpo.plugin as p\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_engine_trains_with_emerge_and_mask_grpo(registry, tmp_path, beta):
    from mdmrl.build import build_parts
    from mdmrl.engine import Trainer
    from mdmrl.recipe import load

    path = tmp_path / "maskgrpo-test.toml"
    path.write_text(RECIPE.format(beta=beta))
    loaded = load(path)
    parts = build_parts(loaded)
    tr = Trainer(loaded, parts, tmp_path, torch.device("cpu"))
    before = {k: v.clone() for k, v in parts.backbone.state_dict().items()}
    row = tr.iterate()
    assert row["phase"] == "model"
    for key in ("ratio_mean", "ratio_min", "ratio_max", "clip_frac", "mask_level", "loss"):
        assert key in row, key
    assert 0.5 < row["mask_level"] < 1.0
    assert ("kl_ref" in row) == (beta > 0)
    assert any(not torch.equal(before[k], v) for k, v in parts.backbone.state_dict().items())
    # mu = 2 inner updates: the second runs after the first step, so its ratio moved off 1
    assert row["ratio_min"] != 1.0 or row["ratio_max"] != 1.0
    assert row["bad_update"] == 0.0


def test_recipe_validation_reports_bad_objective_options(registry, tmp_path):
    from mdmrl.errors import ConfigError
    from mdmrl.recipe import load

    path = tmp_path / "maskgrpo-test.toml"
    path.write_text(RECIPE.format(beta=0.0).replace("gamma = 0.5", "gamma = 1.0\nguidance = 'cfg'"))
    with pytest.raises(ConfigError) as err:
        load(path)
    text = str(err.value)
    assert "objective.options.gamma" in text and "objective.options.guidance" in text
