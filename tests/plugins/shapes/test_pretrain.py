"""Tests of shapes-mdm pretraining (tiny configs, a few steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdmrl import options as opt_schema
from mdmrl.errors import UserError
from mdmrl_plugins.shapes import pretrain as pretrain_mod
from mdmrl_plugins.shapes import world
from mdmrl_plugins.shapes.model import PretrainOptions, ShapesMDM, config_path
from mdmrl_plugins.shapes.pretrain import cosine_mask, lr_factor, make_batch

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "shapes" / "pretrain.toml"
TINY = dict(layers=1, width=16, heads=2, text_layers=1, text_len=12, batch_size=8, threads=0)


def train(tmp_path: Path, name: str, **kw):
    opts = PretrainOptions(**{**TINY, "steps": 20, "lr": 3e-3, "warmup": 2, "log_every": 1, **kw})
    reports: list[tuple[int, float]] = []
    out = tmp_path / f"{name}.safetensors"
    summary = ShapesMDM.pretrain(opts, str(out), lambda s, d: reports.append((s, d["loss"])))
    return summary, out, reports


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("pt"), "a", seed=7)


def test_pretraining_lowers_the_masked_loss(first_run):
    summary, _, reports = first_run
    losses = [loss for _, loss in reports]
    assert [s for s, _ in reports] == list(range(1, 21))
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert summary["loss_curve"] == [[s, round(x, 5)] for s, x in reports]
    assert summary["final_loss"] < summary["first_loss"]


def test_pretraining_writes_loadable_weights_and_config(first_run):
    summary, out, _ = first_run
    meta = json.loads(config_path(out).read_text())
    assert (
        meta["architecture"]["width"] == 16 and meta["architecture"]["codebook_size"] == world.CODEBOOK_SIZE
    )
    assert meta["pretrain"]["steps"] == 20 and meta["pretrain"]["seed"] == 7
    assert meta["final_loss"] == pytest.approx(summary["final_loss"]) and meta["wall_time_s"] >= 0
    m = ShapesMDM.load(str(out))
    assert sum(p.numel() for p in m.parameters()) == meta["parameters"]


def test_pretraining_is_deterministic(tmp_path, first_run):
    summary, out, _ = first_run
    again, out2, _ = train(tmp_path, "b", seed=7)
    assert again["loss_curve"] == summary["loss_curve"]
    a, b = ShapesMDM.load(str(out)).state_dict(), ShapesMDM.load(str(out2)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_another_seed_gives_another_run(tmp_path, first_run):
    other, _, _ = train(tmp_path, "c", seed=8, steps=3)
    assert other["loss_curve"][:3] != first_run[0]["loss_curve"][:3]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 16), st.integers(1, 300))
def test_cosine_mask_counts(seed, batch, n):
    rng = np.random.default_rng(seed)
    u = np.random.default_rng(seed).random(batch)  # the first draw of cosine_mask
    mask = cosine_mask(rng, batch, n)
    expect = np.maximum(1, np.ceil(np.cos(0.5 * np.pi * u) * n))
    assert mask.shape == (batch, n) and mask.dtype == bool
    assert (mask.sum(1) == expect).all()


def test_cosine_mask_mean_ratio():
    mask = cosine_mask(np.random.default_rng(0), 4000, 256)
    # E[cos(pi/2 u)] = 2 / pi for u ~ U(0, 1).
    assert abs(mask.mean() - 2 / math.pi) < 0.02


def test_make_batch_masks_inputs_and_drops_prompts():
    rng = np.random.default_rng(0)
    sample = lambda r: world.sample_pair(r, "train")  # noqa: E731
    prompts, targets, inputs, mask, t = make_batch(rng, 6, 256, world.CODEBOOK_SIZE, 0.0, sample)
    assert all(prompts) and targets.shape == (6, 256) and targets.max() < world.CODEBOOK_SIZE
    assert torch.equal(inputs == world.CODEBOOK_SIZE, mask)
    assert torch.equal(inputs[~mask], targets[~mask])
    assert torch.allclose(t, mask.float().mean(1))
    prompts, *_ = make_batch(rng, 6, 256, world.CODEBOOK_SIZE, 1.0, sample)
    assert prompts == [""] * 6


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, 100, 10) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[100] == pytest.approx(0.0)


def test_recipe_options_validate():
    data = tomllib.loads(RECIPE.read_text())
    assert data["pretrain"]["backbone"] == "shapes-mdm"
    assert data["pretrain"]["output"] == "plugins/shapes/weights/shapes-mdm.safetensors"
    problems: list[str] = []
    opts = opt_schema.build(PretrainOptions, data["pretrain"]["options"], "pretrain.options", problems)
    assert problems == []
    meta = json.loads(
        config_path(Path(__file__).resolve().parents[3] / data["pretrain"]["output"]).read_text()
    )
    # The committed weights were produced by this recipe.
    for key, value in data["pretrain"]["options"].items():
        assert meta["pretrain"][key] == value, key
    assert opts.steps == meta["pretrain"]["steps"]


def test_out_of_range_options_are_reported():
    problems: list[str] = []
    opt_schema.build(PretrainOptions, {"steps": 0, "lr": -1.0, "null_prompt_prob": 2.0}, "p", problems)
    assert len(problems) == 3 and any("p.steps" in p for p in problems)


class _Stop(Exception):
    pass


def interrupted(opts: PretrainOptions, target: Path, step: int) -> None:
    """Run a pretraining that is killed when it reports ``step`` (after the
    checkpoint of the step before it)."""

    def stop(s, _):
        if s == step:
            raise _Stop

    with pytest.raises(_Stop):
        ShapesMDM.pretrain(opts, str(target), stop)


def test_interrupted_pretraining_resumes_exactly(tmp_path, first_run):
    """A run killed after its checkpoint at step 11 and started again with the same
    options ends with the uninterrupted run's weights and loss curve; the partial file
    is gone and the loss plot is written."""
    summary, out, _ = first_run
    opts = PretrainOptions(
        **{
            **TINY,
            "steps": 20,
            "lr": 3e-3,
            "warmup": 2,
            "log_every": 1,
            "seed": 7,
            "checkpoint_minutes": 1e-9,
        }
    )
    target = tmp_path / "r.safetensors"

    interrupted(opts, target, 12)
    partial = pretrain_mod.partial_path(str(target))
    assert partial.exists() and not target.exists()
    resumed = ShapesMDM.pretrain(opts, str(target), None)
    assert resumed["loss_curve"] == summary["loss_curve"]
    a, b = ShapesMDM.load(str(out)).state_dict(), ShapesMDM.load(str(target)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not partial.exists()
    assert pretrain_mod.loss_plot_path(str(target)).stat().st_size > 1000


def test_partial_pretraining_with_other_options_is_refused(tmp_path):
    opts = PretrainOptions(**{**TINY, "steps": 6, "warmup": 1, "log_every": 1, "checkpoint_minutes": 1e-9})
    target = tmp_path / "r.safetensors"

    interrupted(opts, target, 3)
    changed = PretrainOptions(
        **{**TINY, "steps": 6, "warmup": 1, "log_every": 1, "checkpoint_minutes": 1e-9, "lr": 1e-2}
    )
    with pytest.raises(UserError, match=r"partial pretraining with other options \(lr\)"):
        ShapesMDM.pretrain(changed, str(target), None)
    pretrain_mod.partial_path(str(target)).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable pretraining checkpoint"):
        ShapesMDM.pretrain(opts, str(target), None)
