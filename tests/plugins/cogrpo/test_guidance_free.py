"""Guidance-free steps (CFG scale s = 1 for every row): both samplers then run the
conditional forward alone (batch B, not 2B), and the replay does the same."""

from __future__ import annotations

import pytest
import torch
from toys import TinyBackbone, TinyOptions

from mdmrl.trajectory import is_guidance_free
from mdmrl_plugins.cogrpo.gaussian import GaussianOptions, GaussianSchedule
from mdmrl_plugins.cogrpo.sampler import ConfidenceOptions, ConfidenceSampler
from mdmrl_plugins.cogrpo.schedules import (
    AmusedSchedule,
    AmusedScheduleOptions,
    ConstantOptions,
    ConstantSchedule,
    MeissonicOptions,
    MeissonicSchedule,
)
from mdmrl_plugins.maskgrpo.emerge import EmergeSampler

SAMPLERS = {
    "confidence-per_sample": lambda: ConfidenceSampler(ConfidenceOptions(rng="per_sample")),
    "confidence-shared": lambda: ConfidenceSampler(ConfidenceOptions(rng="shared")),
    "emerge": EmergeSampler,
}


class CountingBackbone(TinyBackbone):
    """TinyBackbone that records the batch size of every forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def forward(self, tokens, cond, timestep):
        self.batches.append(int(tokens.shape[0]))
        return super().forward(tokens, cond, timestep)


class Undeclared(ConstantSchedule):
    """A constant schedule with s = 1 that does not say so (the interface's default):
    the sampler learns it only from the actions, after the 2B forward."""

    name = "undeclared"

    def guidance_free(self, step, num_steps):
        return False


def backbone():
    return CountingBackbone(TinyOptions(codebook_size=6, height=4, width=4, dim=16, seed=0))


def constant(cls=ConstantSchedule, cfg=1.0):
    return cls(ConstantOptions(temperature=1.0, remask_temperature=1.0, cfg_scale=cfg))


def test_fixed_and_learned_schedules_say_when_they_are_guidance_free():
    assert constant().guidance_free(0, 4)
    assert not constant(cfg=3.0).guidance_free(0, 4)
    assert MeissonicSchedule(MeissonicOptions(cfg_scale=1.0)).guidance_free(2, 4)
    assert not MeissonicSchedule().guidance_free(2, 4)  # default s = 9
    # aMUSEd's pipeline turns guidance off for guidance_scale <= 1
    assert AmusedSchedule(AmusedScheduleOptions(guidance_scale=0.5)).guidance_free(0, 4)
    assert not AmusedSchedule().guidance_free(0, 4)
    bb = backbone()

    def learned(cfg, trainable):
        opts = GaussianOptions(sigma=0.3, trainable=trainable)
        base = MeissonicSchedule(MeissonicOptions(cfg_scale=cfg))
        return GaussianSchedule(opts, bb.feature_dim, bb.grid_shape, base, hidden=8)

    three = ["temperature", "remask_ratio", "remask_temperature"]
    assert learned(1.0, three).guidance_free(0, 4)
    assert not learned(1.0, three + ["cfg_scale"]).guidance_free(0, 4)  # s is sampled
    assert not learned(3.0, three).guidance_free(0, 4)


def test_is_guidance_free_reads_the_cfg_column():
    acts = torch.tensor([[0.5, 0.3, 2.0, 1.0], [1.0, 0.1, 0.0, 1.0]])
    assert is_guidance_free(acts)
    acts[1, 3] = 1.0001
    assert not is_guidance_free(acts)
    acts[1, 3], acts[1, 0] = 1.0, 3.0  # other columns equal to 1 or not do not matter
    assert is_guidance_free(acts)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_guidance_free_steps_run_batch_b_forwards_and_replay_exactly(name):
    bb, sampler, steps = backbone(), SAMPLERS[name](), 4
    prompts = ["a b", "c", "a b"]
    traj = sampler.sample(bb, constant(), prompts, steps, torch.tensor([1, 2, 3]))
    assert bb.batches == [3] * steps  # no unconditional rows at all
    bb.batches.clear()
    for t in range(steps):
        cond, uncond = bb.encode_prompts(prompts), bb.null_conditioning(3)
        rep = sampler.replay_step(bb, traj, t, cond, uncond)  # with gradients
        assert torch.equal(rep.model_log_prob.detach(), traj.model_log_probs[:, t])
        rep.model_log_prob.sum().backward()
    assert bb.batches == [3] * steps
    assert bb.head.weight.grad is not None and bool(bb.head.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_an_undeclared_s_of_one_gives_the_same_trajectory(name):
    """A schedule that returns s = 1 without declaring it costs one extra forward per
    step, and its trajectory is bit-identical to the declared one's."""
    seeds, prompts = torch.tensor([5, 6]), ["x", "y z"]
    bb = backbone()
    declared = SAMPLERS[name]().sample(bb, constant(), prompts, 3, seeds)
    bb.batches.clear()
    undeclared = SAMPLERS[name]().sample(bb, constant(Undeclared), prompts, 3, seeds)
    assert bb.batches == [4, 2] * 3  # the 2B forward, then the B forward the replay runs
    for f in ("tokens", "filled", "actions", "model_log_probs"):
        assert torch.equal(getattr(declared, f), getattr(undeclared, f)), f


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_guided_steps_still_run_the_2b_forward(name):
    bb = backbone()
    traj = SAMPLERS[name]().sample(bb, constant(cfg=3.0), ["x", "y"], 3, torch.tensor([1, 2]))
    assert bb.batches == [4] * 3
    bb.batches.clear()
    SAMPLERS[name]().replay_step(bb, traj, 1, bb.encode_prompts(["x", "y"]), bb.null_conditioning(2))
    assert bb.batches == [4]
