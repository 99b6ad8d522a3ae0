"""Each hook in mdmrl.hookspecs, exercised through a registered plug-in.

tests/test_plugins.py checks that every hook has a test here (test_hook_<name>)."""

import torch
from toy_plugin import TOYS, ToyPrompts

from mdmrl.build import build_parts
from mdmrl.interfaces import GeneratedBatch, Policies
from mdmrl.recipe import load


def _parts(toy_recipe):
    return build_parts(load(toy_recipe))


def test_hook_register_backbones(toy_registry, toy_recipe):
    reg = toy_registry.get("backbone", "tiny")
    assert reg.plugin == "toys" and reg.distribution == "mdmrl-tests"
    bb = _parts(toy_recipe).backbone
    out = bb(torch.full((2, bb.num_tokens), bb.mask_token_id), bb.encode_prompts(["a", "b"]), torch.ones(2))
    assert out.logits.shape == (2, bb.num_tokens, bb.codebook_size)


def test_hook_register_schedules(toy_registry, toy_recipe):
    assert toy_registry.names("schedule") == ["toy-cosine", "toy-learned"]
    sched = _parts(toy_recipe).schedule
    acts, raw, lp = sched.act(0, 4, 3, None, torch.Generator().manual_seed(0))
    assert acts.shape == (3, 4) and torch.allclose(sched.log_prob(0, 4, None, raw), lp)


def test_hook_register_samplers(toy_registry, toy_recipe):
    p = _parts(toy_recipe)
    traj = p.sampler.sample(p.backbone, p.schedule, ["a b", "c d"], 3, torch.tensor([1, 2]))
    traj.validate(p.backbone.mask_token_id)
    assert traj.num_steps == 3


def test_hook_register_rewarders(toy_registry, toy_recipe):
    p = _parts(toy_recipe)
    tokens = torch.tensor([[1] * 12, [0] * 12])
    res = p.rewarder(GeneratedBatch(["x", "y"], tokens, (3, 4)))
    assert res.total.tolist() == [1.0, 0.0] and set(res.components) == {"toy-count"}


def test_hook_register_objectives(toy_registry, toy_recipe):
    p = _parts(toy_recipe)
    traj = p.sampler.sample(p.backbone, p.schedule, ["a b"] * 4, 3, torch.arange(4))
    pol = Policies(
        p.backbone,
        p.schedule,
        p.sampler,
        p.backbone.encode_prompts(traj.prompts),
        p.backbone.null_conditioning(4),
    )
    out = p.objective.loss(pol, traj, torch.tensor([1.0, -1.0, 0.5, -0.5]), [0, 1, 2], "joint")
    out.loss.backward()
    assert out.stats["ratio_mean"] == 1.0  # on-policy
    assert p.schedule.bias.grad is not None


def test_hook_register_prompt_sources(toy_registry, toy_recipe):
    src = _parts(toy_recipe).train_prompts
    assert isinstance(src, ToyPrompts)
    a = src.sample(5, torch.Generator().manual_seed(1))
    b = src.sample(5, torch.Generator().manual_seed(1))
    assert a == b and len(a) == 5
    assert TOYS is not None
