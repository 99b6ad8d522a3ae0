"""The emerge sampler: valid, reproducible trajectories, the reveal rule, exact replay."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_plugin import ToyLearnedSchedule, ToySchedule
from toys import TinyBackbone, TinyOptions

from mdmrl.interfaces import Backbone, Policies, SchedulePolicy
from mdmrl.trajectory import NUM_ACTIONS, BackboneOutput, Conditioning
from mdmrl_plugins.maskgrpo.emerge import (
    EmergeSampler,
    filled_log_prob,
    guided_log_probs,
    inverse_cdf_sample,
    reveal_probability,
)

PROMPTS = ["red square", "blue circle", "a green thing", ""]


def tiny(seed: int = 0) -> TinyBackbone:
    return TinyBackbone(TinyOptions(codebook_size=6, height=3, width=4, dim=8, seed=seed))


class ConstantBackbone(Backbone):
    """Zero logits everywhere: every token has probability 1/V, whatever the input."""

    name = "constant"

    def __init__(self, codebook_size: int = 5, height: int = 8, width: int = 8):
        super().__init__()
        self.codebook_size = codebook_size
        self.mask_token_id = codebook_size
        self.grid_shape = (height, width)
        self.feature_dim = 2
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_prompts(self, prompts):
        return Conditioning(hidden=torch.zeros(len(prompts), 1, 2))

    def forward(self, tokens, cond, timestep):
        b, n = tokens.shape
        return BackboneOutput(
            logits=torch.zeros(b, n, self.codebook_size) + 0 * self.dummy,
            features=torch.zeros(b, n, self.feature_dim),
        )

    def decode(self, tokens):
        raise NotImplementedError


class FixedRatios(SchedulePolicy):
    """A fixed schedule with given remask ratios, tau = 1, s = 2."""

    name = "fixed-ratios"

    def __init__(self, ratios: list[float], temperature: float = 1.0, cfg: float = 2.0):
        super().__init__()
        self.ratios = ratios
        self.temperature = temperature
        self.cfg = cfg

    def act(self, step, num_steps, batch_size, features, generator, deterministic=False):
        a = torch.tensor([self.temperature, self.ratios[step], 0.0, self.cfg])
        acts = a.expand(batch_size, NUM_ACTIONS).clone()
        return acts, acts.clone(), torch.zeros(batch_size)

    def log_prob(self, step, num_steps, features, raw_actions):
        return torch.zeros(raw_actions.shape[0])


@settings(max_examples=15, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4),
    steps=st.integers(1, 5),
    learned=st.booleans(),
)
def test_trajectories_are_valid_and_reproducible_alone_or_in_batch(seeds, steps, learned):
    bb = tiny()
    sched = ToyLearnedSchedule(ToyLearnedSchedule.Options()) if learned else ToySchedule()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(seeds))]
    s = torch.tensor(seeds)
    sampler = EmergeSampler()
    traj = sampler.sample(bb, sched, prompts, steps, s, torch.arange(len(seeds)))
    traj.validate(bb.mask_token_id)
    assert traj.tokens.shape == (len(seeds), steps + 1, bb.num_tokens)
    assert torch.equal(traj.filled.sum(1), torch.ones(len(seeds), bb.num_tokens, dtype=torch.long))
    again = sampler.sample(bb, sched, prompts, steps, s)
    assert torch.equal(again.tokens, traj.tokens)
    assert torch.equal(again.model_log_probs, traj.model_log_probs)
    assert torch.equal(again.actions, traj.actions)
    b = len(seeds) - 1
    alone = sampler.sample(bb, sched, prompts[b:], steps, s[b:])
    assert torch.equal(alone.tokens[0], traj.tokens[b])
    assert torch.equal(alone.actions[0], traj.actions[b])
    assert torch.allclose(alone.model_log_probs[0], traj.model_log_probs[b], atol=1e-5)
    if learned and steps > 1 and len(set(seeds)) > 1:
        # the schedule draw comes from each row's own generator
        assert traj.raw_actions[:, 0, 1].unique().numel() > 1


def test_different_seeds_give_different_images():
    bb = ConstantBackbone(codebook_size=7, height=4, width=4)
    traj = EmergeSampler().sample(bb, FixedRatios([0.6, 0.2, 0.0]), ["x"] * 2, 3, torch.tensor([5, 6]))
    assert not torch.equal(traj.final_tokens[0], traj.final_tokens[1])


@settings(max_examples=12, deadline=None)
@given(seeds=st.lists(st.integers(0, 10**6), min_size=1, max_size=3), steps=st.integers(1, 4))
def test_replay_equals_recorded_log_probs_exactly(seeds, steps):
    bb = tiny(seed=3)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(seeds))]
    sampler = EmergeSampler()
    ratios = [1.0 - (t + 1) / steps for t in range(steps)]
    traj = sampler.sample(
        bb, FixedRatios(ratios, temperature=0.7, cfg=3.0), prompts, steps, torch.tensor(seeds)
    )
    cond = bb.encode_prompts(prompts)
    uncond = bb.null_conditioning(len(prompts))
    for t in range(steps):
        rep = sampler.replay_step(bb, traj, t, cond, uncond)
        assert torch.equal(rep.model_log_prob, traj.model_log_probs[:, t])
        assert rep.features.shape == (len(seeds), bb.num_tokens, bb.feature_dim)
        assert not rep.features.requires_grad


def test_replay_has_gradients_and_matches_a_direct_computation():
    bb = tiny(seed=1)
    prompts = PROMPTS[:3]
    sampler = EmergeSampler()
    traj = sampler.sample(
        bb, FixedRatios([0.5, 0.0], temperature=0.9, cfg=2.5), prompts, 2, torch.tensor([1, 2, 3])
    )
    cond, uncond = bb.encode_prompts(prompts), bb.null_conditioning(3)
    rep = sampler.replay_step(bb, traj, 1, cond, uncond)
    assert rep.model_log_prob.requires_grad
    rep.model_log_prob.sum().backward()
    assert bb.head.weight.grad is not None and bb.head.weight.grad.abs().sum() > 0
    # direct: u + s (c - u), tempered, summed over the filled positions
    with torch.no_grad():
        x = traj.tokens[:, 1]
        ts = (x == bb.mask_token_id).float().mean(1)
        c = bb(x, cond, ts).logits
        u = bb(x, uncond, ts).logits
        lp = torch.log_softmax((u + 2.5 * (c - u)) / 0.9, -1)
        picked = lp.gather(-1, traj.tokens[:, 2, :, None].clamp_max(5))[..., 0]
        direct = (picked * traj.filled[:, 1]).sum(1)
    assert torch.allclose(direct, traj.model_log_probs[:, 1], atol=1e-5)


def test_reveal_probability_follows_the_schedule_on_a_large_batch():
    """Every masked token is revealed with p = (m_t - m_s) / m_t, independently."""
    v = 5
    bb = ConstantBackbone(codebook_size=v, height=8, width=8)
    ratios = [0.7, 0.7, 0.3, 0.1, 0.0]  # step 1 reveals nothing (p = 0)
    b = 256
    traj = EmergeSampler().sample(bb, FixedRatios(ratios), ["p"] * b, len(ratios), torch.arange(b) + 12345)
    masked = traj.tokens == bb.mask_token_id  # [B, T+1, N]
    nominal = [1.0] + ratios
    for t in range(len(ratios) - 1):
        p = (nominal[t] - nominal[t + 1]) / nominal[t]
        m = int(masked[:, t].sum())
        k = int(traj.filled[:, t].sum())
        if p == 0.0:
            assert k == 0
            assert torch.equal(traj.model_log_probs[:, t], torch.zeros(b))
            continue
        z = (k - m * p) / math.sqrt(m * p * (1 - p))
        assert abs(z) < 4.5, (t, k, m, p, z)
    # the last step reveals all that is left
    assert not masked[:, -1].any()
    assert torch.equal(traj.filled[:, -1], masked[:, -2])
    # revealed tokens are uniform over V (chi-square with V - 1 = 4 dof; 99.99% quantile ~ 23.5)
    counts = torch.bincount(traj.final_tokens.flatten(), minlength=v).float()
    expect = counts.sum() / v
    assert float(((counts - expect) ** 2 / expect).sum()) < 23.5
    # log pi of a step = number revealed x log(1/V)
    n_rev = traj.filled.sum(-1).float()
    assert torch.allclose(traj.model_log_probs, -n_rev * math.log(v), atol=1e-3)


def test_a_rising_remask_ratio_is_clamped_to_a_monotone_schedule():
    bb = ConstantBackbone(codebook_size=3, height=4, width=4)
    traj = EmergeSampler().sample(bb, FixedRatios([0.2, 0.9, 0.0]), ["p"] * 8, 3, torch.arange(8))
    # step 1 asks for more masks than step 0 left: nothing is revealed (p = 0)
    assert not traj.filled[:, 1].any()
    traj.validate(bb.mask_token_id)


@settings(max_examples=25, deadline=None)
@given(
    before=st.floats(1e-3, 1.0),
    frac=st.floats(0.0, 1.0),
)
def test_reveal_probability_formula(before, frac):
    after = before * frac
    p = reveal_probability(torch.tensor([before]), torch.tensor([after]))
    alpha_t, alpha_s = 1 - before, 1 - after
    assert math.isclose(float(p), (alpha_s - alpha_t) / (1 - alpha_t), rel_tol=1e-4, abs_tol=1e-5)
    assert 0.0 <= float(p) <= 1.0
    # nothing masked before the step: reveal whatever is left
    assert float(reveal_probability(torch.tensor([0.0]), torch.tensor([0.0]))) == 1.0


def test_inverse_cdf_sampling_never_draws_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0]]).repeat(500, 1)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    idx = inverse_cdf_sample(probs, u)
    assert set(idx[0::2].tolist()) == {1, 3}
    assert set(idx[1::2].tolist()) == {2}
    frac = (idx[0::2] == 1).float().mean()
    assert 0.4 < float(frac) < 0.6


def test_filled_log_prob_ignores_unfilled_positions_even_at_minus_infinity():
    lp = torch.log(torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]))  # [1, 2, 2]; position 0 token 1 has -inf
    nxt = torch.tensor([[1, 0]])
    out = filled_log_prob(lp, nxt, torch.tensor([[False, True]]))
    assert torch.allclose(out, torch.tensor([math.log(0.5)]))


def test_guided_log_probs_without_uncond_is_the_conditional_model():
    bb = tiny()
    x = torch.full((2, bb.num_tokens), bb.mask_token_id)
    cond = bb.encode_prompts(PROMPTS[:2])
    lp, feats = guided_log_probs(bb, x, cond, None, torch.ones(2), torch.full((2,), 5.0))
    direct = torch.log_softmax(bb(x, cond, torch.ones(2)).logits, -1)
    assert torch.allclose(lp, direct)
    assert feats.shape == (2, bb.num_tokens, bb.feature_dim)


def test_emerge_trajectories_train_with_the_co_grpo_objective():
    """Co-GRPO's objective replays emerge steps through ``replay_step``: on-policy ratio 1."""
    from mdmrl_plugins.cogrpo.objective import GRPOObjective

    bb = tiny(seed=2)
    sampler = EmergeSampler()
    sched = ToySchedule()
    prompts = PROMPTS[:4]
    traj = sampler.sample(bb, sched, prompts, 3, torch.tensor([4, 5, 6, 7]))
    pol = Policies(bb, sched, sampler, bb.encode_prompts(prompts), bb.null_conditioning(4))
    out = GRPOObjective().loss(pol, traj, torch.tensor([1.0, -1.0, 0.5, -0.5]), [0, 1, 2], "model")
    assert out.stats["ratio_min"] == 1.0 and out.stats["ratio_max"] == 1.0
    out.loss.backward()
    assert bb.head.weight.grad is not None
