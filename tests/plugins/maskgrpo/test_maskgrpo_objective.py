"""The MaskGRPO objective: truncated levels, seeded masks, the ELBO, the old policy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from toy_plugin import ToySampler, ToySchedule
from toys import TinyBackbone, TinyOptions

from mdmrl import options as opts
from mdmrl.errors import UserError
from mdmrl.interfaces import Policies, SchedulePolicy
from mdmrl.trajectory import NUM_ACTIONS
from mdmrl_plugins.maskgrpo.emerge import EmergeSampler
from mdmrl_plugins.maskgrpo.objective import (
    MaskGRPOObjective,
    MaskGRPOOptions,
    clip_active,
    clipped_surrogate,
    kl_k3,
    mask_levels,
    masked_count,
    seeded_mask,
    sequence_elbo,
)

PROMPTS = ["red square", "blue circle", "a green thing", "red circle"]


class Guided(SchedulePolicy):
    """Fixed schedule whose temperature and CFG scale change over the steps."""

    name = "guided-test"

    def act(self, step, num_steps, batch_size, features, generator, deterministic=False):
        a = torch.tensor([0.8 + 0.1 * step, 1.0 - (step + 1) / num_steps, 0.0, 1.5 + step])
        acts = a.expand(batch_size, NUM_ACTIONS).clone()
        return acts, acts.clone(), torch.zeros(batch_size)

    def log_prob(self, step, num_steps, features, raw_actions):
        return torch.zeros(raw_actions.shape[0])


class Recording(TinyBackbone):
    """TinyBackbone that records the token grids it is given."""

    def __init__(self, options):
        super().__init__(options)
        self.seen: list[torch.Tensor] = []

    def forward(self, tokens, cond, timestep):
        self.seen.append(tokens.detach().clone())
        return super().forward(tokens, cond, timestep)


def tiny(seed: int = 0, cls=TinyBackbone, h: int = 4, w: int = 4) -> TinyBackbone:
    return cls(TinyOptions(codebook_size=6, height=h, width=w, dim=8, seed=seed))


def rollout(bb, seeds=(11, 12, 13, 14), steps=3):
    sampler, sched = EmergeSampler(), Guided()
    prompts = [PROMPTS[i % 4] for i in range(len(seeds))]
    traj = sampler.sample(bb, sched, prompts, steps, torch.tensor(list(seeds)))
    pol = Policies(bb, sched, sampler, bb.encode_prompts(prompts), bb.null_conditioning(len(prompts)))
    return traj, pol


# -- truncation -------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(mu=st.integers(1, 200), gamma=st.floats(0.0, 0.999))
def test_every_mask_level_is_strictly_inside_gamma_one(mu, gamma):
    levels = mask_levels(mu, gamma)
    assert len(levels) == mu
    assert all(gamma < t < 1.0 for t in levels)
    assert all(a < b for a, b in zip(levels, levels[1:]))
    # midpoints of mu equal slices of (gamma, 1)
    width = (1.0 - gamma) / mu
    assert math.isclose(levels[0] - gamma, width / 2, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=25, deadline=None)
@given(mu=st.integers(1, 64), gamma=st.floats(0.0, 0.99), n=st.integers(2, 4096))
def test_realised_mask_fraction_is_inside_gamma_one_when_the_grid_allows(mu, gamma, n):
    for t in mask_levels(mu, gamma):
        k = masked_count(t, n)
        assert 1 <= k <= n - 1
        assert k / n < 1.0
        if gamma < (n - 1) / n:
            assert k / n > gamma


@pytest.mark.parametrize("mu,gamma", [(0, 0.5), (2, 1.0), (2, -0.1)])
def test_mask_levels_reject_bad_arguments(mu, gamma):
    with pytest.raises(ValueError):
        mask_levels(mu, gamma)


# -- seeded masks -----------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=5),
    mu=st.integers(2, 6),
    salt=st.integers(0, 10),
)
def test_seeded_masks_are_reproducible_and_differ_across_levels(seeds, mu, salt):
    n = 256
    s = torch.tensor(seeds)
    levels = mask_levels(mu, 0.5)
    masks = [seeded_mask(s, j + 1, levels[j], n, salt) for j in range(mu)]
    for j, m in enumerate(masks):
        assert torch.equal(m, seeded_mask(s, j + 1, levels[j], n, salt))
        assert torch.equal(m.sum(1), torch.full((len(seeds),), masked_count(levels[j], n)))
    for a in range(mu):
        for b in range(a + 1, mu):
            # same level, different term index: still a different mask
            assert not torch.equal(masks[a][0], seeded_mask(s, b + 1, levels[a], n, salt)[0])
    other = seeded_mask(s, 1, levels[0], n, salt + 1)
    assert not torch.equal(other[0], masks[0][0])
    # a row's mask depends on its own seed only
    assert torch.equal(seeded_mask(s[-1:], 1, levels[0], n, salt)[0], masks[0][-1])


def test_current_and_old_policy_see_the_same_masked_grid():
    bb = tiny(cls=Recording)
    traj, pol = rollout(bb)
    obj = MaskGRPOObjective(MaskGRPOOptions(mu=3, gamma=0.5))
    bb.seen.clear()
    obj.loss(pol, traj, torch.ones(4), [1], "model")
    # 1 current forward + mu old forwards, each on 2B rows (cond and uncond share the grid)
    assert len(bb.seen) == 1 + 3
    current, old_level_1 = bb.seen[0], bb.seen[1 + 1]
    assert torch.equal(current, old_level_1)
    assert not torch.equal(bb.seen[1], bb.seen[2])
    masked = current[:4] == bb.mask_token_id
    assert torch.equal(masked, seeded_mask(traj.seeds, 2, obj.levels[1], bb.num_tokens))
    assert torch.equal(current[:4][~masked], traj.final_tokens[~masked])
    assert torch.equal(current[:4], current[4:])
    # a later call for the same level (cached old value) masks the same positions again
    bb.seen.clear()
    obj.loss(pol, traj, torch.ones(4), [1], "model")
    assert len(bb.seen) == 1 and torch.equal(bb.seen[0], current)


# -- the ELBO -----------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(term=st.integers(0, 3), guidance=st.sampled_from(["rollout", "conditional"]))
def test_elbo_equals_a_direct_computation_from_logits(term, guidance):
    bb = tiny(seed=4)
    traj, pol = rollout(bb)
    obj = MaskGRPOObjective(MaskGRPOOptions(mu=4, gamma=0.6, guidance=guidance))
    with torch.no_grad():
        got = obj.elbo(bb, traj, term, pol.cond, pol.uncond)
        o = traj.final_tokens
        n = o.shape[1]
        k = masked_count(obj.levels[term], n)
        m = seeded_mask(traj.seeds, term + 1, obj.levels[term], n)
        x = torch.where(m, bb.mask_token_id, o)
        ts = torch.full((4,), k / n)
        c = bb(x, pol.cond, ts).logits
        if guidance == "rollout":
            u = bb(x, pol.uncond, ts).logits
            s = traj.actions[:, :, 3].mean(1)[:, None, None]
            tau = traj.actions[:, :, 0].mean(1)[:, None, None]
            logits = (u + s * (c - u)) / tau
        else:
            logits = c
        lp = torch.log_softmax(logits, -1)
        expect = torch.stack(
            [sum(lp[b, i, o[b, i]] for i in range(n) if m[b, i]) / ((k / n) * n) for b in range(4)]
        )
    assert torch.allclose(got, expect, atol=1e-5)
    assert torch.allclose(sequence_elbo(lp, o, m, torch.full((4,), k / n)), expect, atol=1e-5)


def test_guidance_options_score_different_distributions():
    bb = tiny(seed=5)
    traj, pol = rollout(bb)
    with torch.no_grad():
        a = MaskGRPOObjective(MaskGRPOOptions(guidance="rollout")).elbo(bb, traj, 0, pol.cond, pol.uncond)
        b = MaskGRPOObjective(MaskGRPOOptions(guidance="conditional")).elbo(bb, traj, 0, pol.cond, pol.uncond)
    assert not torch.allclose(a, b)


# -- the ratio and the loss ----------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(
    adv=st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    term=st.integers(0, 3),
    guidance=st.sampled_from(["rollout", "conditional"]),
    seed=st.integers(0, 1000),
)
def test_on_policy_ratio_is_exactly_one_and_the_loss_is_plain_policy_gradient(adv, term, guidance, seed):
    bb = tiny(seed=seed % 7)
    traj, pol = rollout(bb, seeds=(seed, seed + 1, seed + 2, seed + 3))
    obj = MaskGRPOObjective(MaskGRPOOptions(mu=4, guidance=guidance))
    a = torch.tensor(adv)
    out = obj.loss(pol, traj, a, [term], "model")
    assert out.stats["ratio_min"] == 1.0 and out.stats["ratio_max"] == 1.0
    assert out.stats["clip_frac"] == 0.0
    assert float(out.loss.detach()) == float(-a.mean())
    bb.zero_grad()
    out.loss.backward()
    clipped_grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in bb.parameters()]
    # plain policy gradient: -mean(A * grad l_theta)
    bb.zero_grad()
    cond, uncond = bb.encode_prompts(traj.prompts), bb.null_conditioning(4)
    (-(a * obj.elbo(bb, traj, term, cond, uncond)).mean()).backward()
    for g, p in zip(clipped_grads, bb.parameters()):
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(g, ref, atol=1e-6)


def test_ratio_is_one_on_a_sub_batch_of_a_seen_rollout():
    bb = tiny(seed=2)
    traj, pol = rollout(bb)
    obj = MaskGRPOObjective(MaskGRPOOptions(mu=2))
    obj.loss(pol, traj, torch.ones(4), [0], "model")
    ix = torch.tensor([3, 1])
    sub = traj.select(ix)
    pol_sub = Policies(bb, pol.schedule, pol.sampler, pol.cond.index(ix), pol.uncond.index(ix))
    out = obj.loss(pol_sub, sub, torch.ones(2), [1], "model")
    assert abs(out.stats["ratio_min"] - 1.0) < 1e-6 and abs(out.stats["ratio_max"] - 1.0) < 1e-6


def test_old_policy_is_frozen_at_first_sight_and_the_ratio_moves_after_an_update():
    bb = tiny(seed=3)
    traj, pol = rollout(bb)
    obj = MaskGRPOObjective(MaskGRPOOptions(mu=2, clip_eps=0.2))
    with torch.no_grad():
        before = [obj.elbo(bb, traj, j, pol.cond, pol.uncond) for j in range(2)]
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = obj.loss(pol, traj, adv, [0], "model")
    assert out.stats["ratio_mean"] == 1.0
    bb.zero_grad()
    out.loss.backward()
    with torch.no_grad():  # one plain SGD step
        for p in bb.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    pol = Policies(bb, pol.schedule, pol.sampler, bb.encode_prompts(traj.prompts), bb.null_conditioning(4))
    # the old values of both levels were taken before the update
    for j in range(2):
        assert torch.equal(obj.old_elbo(pol, traj, j), before[j])
    out = obj.loss(pol, traj, adv, [1], "model")
    assert out.stats["ratio_min"] != 1.0 or out.stats["ratio_max"] != 1.0
    with torch.no_grad():
        now = obj.elbo(bb, traj, 1, pol.cond, pol.uncond)
    assert math.isclose(out.stats["ratio_mean"], float(torch.exp(now - before[1]).mean()), rel_tol=1e-5)
    # prepare() starts a new rollout batch: the current weights become the old policy
    obj.prepare(pol, traj)
    out = obj.loss(pol, traj, adv, [1], "model")
    assert out.stats["ratio_min"] == 1.0 and out.stats["ratio_max"] == 1.0


@settings(max_examples=25, deadline=None)
@given(
    ratio=st.lists(st.floats(0.2, 3.0), min_size=1, max_size=8),
    sign=st.sampled_from([-1.0, 1.0]),
    eps=st.floats(0.05, 0.5),
)
def test_clipped_surrogate_takes_the_pessimistic_branch(ratio, sign, eps):
    # exactly at a clip boundary the two branches tie and split the gradient
    assume(all(abs(x - (1 - eps)) > 1e-4 and abs(x - (1 + eps)) > 1e-4 for x in ratio))
    r = torch.tensor(ratio, requires_grad=True)
    a = torch.full_like(r, sign)
    loss = clipped_surrogate(r, a, eps)
    expect = -torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
    assert torch.allclose(loss, expect)
    loss.sum().backward()
    active = clip_active(r.detach(), a, eps)
    assert torch.all(r.grad[active] == 0)
    assert torch.allclose(r.grad[~active], -a[~active])


def test_kl_to_the_reference_is_zero_for_a_copy_and_positive_otherwise():
    bb = tiny(seed=6)
    traj, pol = rollout(bb)
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    obj = MaskGRPOObjective(MaskGRPOOptions(mu=2, kl_beta=0.3))
    with pytest.raises(UserError, match="kl_beta"):
        obj.loss(pol, traj, adv, [0], "model")
    pol.reference = copy.deepcopy(bb).requires_grad_(False)
    out = obj.loss(pol, traj, adv, [0], "model")
    assert out.stats["kl_ref"] == 0.0
    assert float(out.loss.detach()) == float(-adv.mean())
    ref = tiny(seed=9).requires_grad_(False)
    pol.reference = ref
    out = MaskGRPOObjective(MaskGRPOOptions(mu=2, kl_beta=0.3)).loss(pol, traj, adv, [0], "model")
    with torch.no_grad():
        new = obj.elbo(bb, traj, 0, pol.cond, pol.uncond)
        r = obj.elbo(ref, traj, 0, ref.encode_prompts(traj.prompts), ref.null_conditioning(4))
    kl = kl_k3(new, r).mean()
    assert out.stats["kl_ref"] > 0
    assert math.isclose(out.stats["kl_ref"], float(kl), rel_tol=1e-5)
    assert math.isclose(float(out.loss.detach()), float(-adv.mean() + 0.3 * kl), rel_tol=1e-5, abs_tol=1e-6)


@settings(max_examples=25, deadline=None)
@given(d=st.floats(-5, 5))
def test_k3_is_nonnegative_and_zero_only_on_equal_values(d):
    v = kl_k3(torch.tensor([0.0]), torch.tensor([d]))
    assert float(v) >= 0.0
    assert (float(v) == 0.0) == (d == 0.0) or abs(d) < 1e-3


def test_objective_works_on_another_samplers_trajectories():
    """Only final tokens, prompts, seeds and recorded actions are read."""
    bb = tiny(seed=1)
    sampler, sched = ToySampler(), ToySchedule()
    traj = sampler.sample(bb, sched, PROMPTS, 3, torch.tensor([1, 2, 3, 4]))
    pol = Policies(bb, sched, sampler, bb.encode_prompts(PROMPTS), bb.null_conditioning(4))
    obj = MaskGRPOObjective()
    assert obj.num_terms(traj) == 4
    out = obj.loss(pol, traj, torch.tensor([1.0, -1.0, 2.0, 0.0]), [0, 3], "model")
    assert out.stats["ratio_mean"] == 1.0
    assert math.isclose(out.stats["mask_level"], (obj.levels[0] + obj.levels[3]) / 2)
    out.loss.backward()
    assert bb.head.weight.grad.abs().sum() > 0


def test_loss_rejects_other_phases_and_bad_terms():
    bb = tiny()
    traj, pol = rollout(bb)
    obj = MaskGRPOObjective(MaskGRPOOptions(mu=2))
    assert obj.update_per_term and obj.phases == ("model",)
    with pytest.raises(ValueError, match="model"):
        obj.loss(pol, traj, torch.ones(4), [0], "schedule")
    with pytest.raises(ValueError, match="outside"):
        obj.loss(pol, traj, torch.ones(4), [2], "model")
    with pytest.raises(ValueError):
        obj.loss(pol, traj, torch.ones(4), [], "model")


@pytest.mark.parametrize(
    "table,fragment",
    [
        ({"mu": 0}, "mu"),
        ({"gamma": 1.0}, "gamma"),
        ({"gamma": -0.1}, "gamma"),
        ({"guidance": "cfg"}, "guidance"),
        ({"kl_beta": -1.0}, "kl_beta"),
    ],
)
def test_options_schema_rejects_out_of_range_values(table, fragment):
    problems: list[str] = []
    opts.build(MaskGRPOOptions, table, "objective.options", problems)
    assert problems and any(fragment in p for p in problems)


def test_constructor_rejects_bad_options_with_a_user_error():
    with pytest.raises(UserError, match="objective.options.guidance"):
        MaskGRPOObjective(MaskGRPOOptions(guidance="cfg"))
    with pytest.raises(UserError, match="objective.options.gamma"):
        MaskGRPOObjective(MaskGRPOOptions(gamma=1.0))
