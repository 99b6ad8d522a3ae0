"""Property tests of Co-GRPO's math (hypothesis).

(a) the factorisation of the joint ratio (Eq. 13, 17) and the model log-prob (Eq. 8);
(b) with a fixed schedule, "joint" equals Naive GRPO ("model") exactly;
(c) on-policy, every ratio is 1 and the loss is the plain policy gradient;
(d) the Gaussian log-prob is in test_gaussian.py (against torch.distributions);
(e) clipping at the epsilon boundaries;
(f) group advantages.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toys import TinyBackbone, TinyOptions

from mdmrl.advantages import group_advantages
from mdmrl.interfaces import BuildContext, Policies
from mdmrl.plugins import get_registry
from mdmrl.trajectory import ACTION_FIELDS
from mdmrl_plugins.cogrpo.gaussian import GaussianOptions, GaussianSchedule
from mdmrl_plugins.cogrpo.objective import GRPOObjective, GRPOOptions, clip_active, clipped_surrogate
from mdmrl_plugins.cogrpo.sampler import ConfidenceSampler

SETTINGS = settings(max_examples=25, deadline=None)


# ------------------------------------------------------------------- end to end

FIXED = ["meissonic", "meissonic-table1", "cosine-gamma", "constant"]
WORDS = ["red", "blue", "big", "small", "circle"]


@st.composite
def setups(draw, learned: bool = True):
    """A tiny backbone, a schedule (Gaussian over a fixed base, or the fixed base), a
    batch of prompts and seeds, and T: arbitrary shapes, masks and schedules."""
    h, w = draw(st.integers(2, 3)), draw(st.integers(2, 4))
    opts = TinyOptions(
        codebook_size=draw(st.integers(3, 7)),
        height=h,
        width=w,
        dim=draw(st.sampled_from([4, 8])),
        seed=draw(st.integers(0, 100)),
    )
    b = draw(st.integers(1, 4))
    steps = draw(st.integers(1, min(4, h * w)))
    base = draw(st.sampled_from(FIXED))
    prompts = [" ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3))) for _ in range(b)]
    seeds = torch.tensor(draw(st.lists(st.integers(0, 2**31 - 2), min_size=b, max_size=b)))
    backbone = TinyBackbone(opts)
    ctx = BuildContext(backbone=backbone)
    if learned:
        trainable = draw(st.lists(st.sampled_from(ACTION_FIELDS), min_size=1, max_size=4, unique=True))
        gopts = GaussianOptions(base=base, sigma=draw(st.floats(0.05, 0.5)), trainable=trainable, hidden=8)
        schedule = GaussianSchedule.from_options(gopts, ctx)
    else:
        cls = get_registry().get("schedule", base).cls
        schedule = cls.from_options(cls.Options(), ctx)
    return backbone, schedule, prompts, seeds, steps, draw(st.integers(0, 10**6))


def perturb(module, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def policies_for(backbone, schedule, traj):
    cond = backbone.encode_prompts(traj.prompts)
    return Policies(
        backbone, schedule, ConfidenceSampler(), cond, backbone.null_conditioning(traj.batch_size)
    )


def independent_model_log_prob(backbone, traj, t):
    """Eq. 8 from scratch: separate conditional and unconditional forwards, guided and
    tempered logits, a log-softmax, and a loop over the filled positions. float64 [B]."""
    tokens = traj.tokens[:, t]
    frac = (tokens == backbone.mask_token_id).double().mean(1).float()
    with torch.no_grad():
        c = backbone(tokens, backbone.encode_prompts(traj.prompts), frac).logits.double()
        u = backbone(tokens, backbone.null_conditioning(traj.batch_size), frac).logits.double()
    out = torch.zeros(traj.batch_size, dtype=torch.float64)
    for i in range(traj.batch_size):
        tau, s = float(traj.actions[i, t, 0]), float(traj.actions[i, t, 3])
        logp = torch.log_softmax((u[i] + s * (c[i] - u[i])) / tau, dim=-1)
        for j in traj.filled[i, t].nonzero().flatten().tolist():
            out[i] += logp[j, int(traj.tokens[i, t + 1, j])]
    return out


def independent_schedule_log_prob(schedule, traj, t, features):
    """Eq. 14 with torch.distributions over the trainable raw components. float [B]."""
    mean, _ = schedule.mean(t, traj.num_steps, features)
    idx = [ACTION_FIELDS.index(f) for f in schedule.trainable]
    dist = torch.distributions.Normal(mean[:, idx].double(), schedule.sigma)
    return dist.log_prob(traj.raw_actions[:, t, idx].double()).sum(-1)


@SETTINGS
@given(setup=setups(learned=True))
def test_a_joint_ratio_factorises_into_model_and_schedule(setup):
    backbone, schedule, prompts, seeds, steps, seed = setup
    sampler = ConfidenceSampler()
    traj = sampler.sample(backbone, schedule, prompts, steps, seeds)
    pol = policies_for(backbone, schedule, traj)
    old_model, old_sched = [], []
    for t in range(steps):
        # the recorded old log-probs are Eq. 8 and Eq. 14 computed independently
        ind = independent_model_log_prob(backbone, traj, t)
        assert torch.allclose(traj.model_log_probs[:, t].double(), ind, rtol=1e-4, atol=1e-4)
        feats = sampler.replay_step(backbone, traj, t, pol.cond, pol.uncond).features
        ind_s = independent_schedule_log_prob(schedule, traj, t, feats)
        assert torch.allclose(traj.schedule_log_probs[:, t].double(), ind_s, rtol=1e-4, atol=1e-4)
        old_model.append(ind)
        old_sched.append(ind_s)
    # move both policies away from the rollout policy
    perturb(backbone, 0.1, seed)
    perturb(schedule.net, 0.3, seed + 1)
    obj = GRPOObjective()
    pol = policies_for(backbone, schedule, traj)
    with torch.no_grad():
        for t in range(steps):
            joint, _ = obj.step_ratios(pol, traj, t, "joint")
            model, _ = obj.step_ratios(pol, traj, t, "model")
            sched, rep = obj.step_ratios(pol, traj, t, "schedule")
            # Eq. 17: log r_joint = log r_model + log r_schedule, and each phase picks its factor (Eq. 21)
            assert torch.equal(joint.log_r, joint.log_r_model + joint.log_r_schedule)
            assert torch.equal(model.log_r, joint.log_r_model)
            assert torch.equal(sched.log_r, joint.log_r_schedule)
            # ... and equals the ratio of the joint densities computed independently
            new = independent_model_log_prob(backbone, traj, t) + independent_schedule_log_prob(
                schedule, traj, t, rep.features
            )
            want = new - (old_model[t] + old_sched[t])
            assert torch.allclose(joint.log_r.double(), want, rtol=1e-4, atol=1e-3)


def loss_and_grads(obj, backbone, schedule, traj, adv, terms, phase):
    params = [p for p in list(backbone.parameters()) + list(schedule.parameters()) if p.requires_grad]
    for p in params:
        p.grad = None
    out = obj.loss(policies_for(backbone, schedule, traj), traj, adv, terms, phase)
    out.loss.backward()
    return out, [None if p.grad is None else p.grad.clone() for p in params]


@SETTINGS
@given(
    setup=setups(learned=False),
    eps=st.floats(0.05, 0.5),
    adv_seed=st.integers(0, 1000),
    data=st.data(),
)
def test_b_fixed_schedule_joint_equals_naive_grpo_exactly(setup, eps, adv_seed, data):
    backbone, schedule, prompts, seeds, steps, seed = setup
    traj = ConfidenceSampler().sample(backbone, schedule, prompts, steps, seeds)
    perturb(backbone, 0.2, seed)  # ratios away from 1 so that some clip
    terms = sorted(data.draw(st.sets(st.integers(0, steps - 1), min_size=1)))
    adv = torch.randn(traj.batch_size, generator=torch.Generator().manual_seed(adv_seed))
    obj = GRPOObjective(GRPOOptions(clip_eps=eps))
    joint, g_joint = loss_and_grads(obj, backbone, schedule, traj, adv, terms, "joint")
    naive, g_naive = loss_and_grads(obj, backbone, schedule, traj, adv, terms, "model")
    assert torch.equal(joint.loss, naive.loss)
    assert joint.stats == naive.stats
    assert len(g_joint) == len(g_naive) > 0
    for a, b in zip(g_joint, g_naive):
        assert (a is None and b is None) or torch.equal(a, b)


@SETTINGS
@given(
    setup=setups(learned=True),
    adv_seed=st.integers(0, 1000),
    phase=st.sampled_from(["model", "schedule", "joint"]),
)
def test_c_on_policy_ratios_are_one_and_the_loss_is_the_policy_gradient(setup, adv_seed, phase):
    backbone, schedule, prompts, seeds, steps, _ = setup
    sampler = ConfidenceSampler()
    traj = sampler.sample(backbone, schedule, prompts, steps, seeds)
    adv = torch.randn(traj.batch_size, generator=torch.Generator().manual_seed(adv_seed))
    obj = GRPOObjective()
    terms = list(range(steps))
    out, grads = loss_and_grads(obj, backbone, schedule, traj, adv, terms, phase)
    pol = policies_for(backbone, schedule, traj)
    # every ratio is exactly 1 before any update
    assert out.stats["ratio_min"] == out.stats["ratio_max"] == 1.0
    assert out.stats["clip_frac"] == 0.0
    assert torch.equal(out.loss.detach(), -(adv.mean() * len(terms)) / len(terms))
    # gradients of the plain policy gradient -mean(A * grad log pi), written out
    params = [p for p in list(backbone.parameters()) + list(schedule.parameters()) if p.requires_grad]
    for p in params:
        p.grad = None
    total = 0.0
    for t in terms:
        ctx = torch.no_grad() if phase == "schedule" else torch.enable_grad()
        with ctx:
            rep = sampler.replay_step(backbone, traj, t, pol.cond, pol.uncond)
        logp = torch.zeros(traj.batch_size)
        if phase != "schedule":
            logp = logp + rep.model_log_prob
        if phase != "model":
            logp = logp + schedule.log_prob(t, steps, rep.features, traj.raw_actions[:, t])
        total = total - (adv * logp).mean()
    (total / len(terms)).backward()
    for p, g in zip(params, grads):
        if p.grad is None:
            assert g is None or not bool(g.any())
        else:
            assert g is not None
            assert torch.equal(g, p.grad)
    trained = list(backbone.parameters()) if phase != "schedule" else list(schedule.parameters())
    # unless every drawn token had probability 1.0 in float32 (a saturated softmax, e.g.
    # s = 9 on a 3-token codebook: grad log pi = onehot - p then underflows to 0 or nearly)
    if phase != "model" or bool((traj.model_log_probs < 0).any()):
        assert any(p.grad is not None and bool(p.grad.any()) for p in trained)


# ----------------------------------------------------------------------------- (e)


@SETTINGS
@given(
    ratios=st.lists(st.floats(0.05, 3.0), min_size=1, max_size=8),
    advs=st.lists(st.floats(-3.0, 3.0), min_size=8, max_size=8),
    eps=st.floats(0.01, 0.99),
)
def test_clipping_stops_the_gradient_only_beyond_the_trust_region(ratios, advs, eps):
    r = torch.tensor(ratios, requires_grad=True)
    a = torch.tensor(advs[: len(ratios)])
    loss = clipped_surrogate(r, a, eps)
    # value: the min form of Eq. 9/15
    ref = -torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
    assert torch.allclose(loss, ref)
    loss.sum().backward()
    beyond = ((a > 0) & (r > 1 + eps)) | ((a < 0) & (r < 1 - eps))
    assert torch.equal(clip_active(r.detach(), a, eps), beyond)
    assert torch.equal(r.grad[beyond], torch.zeros(int(beyond.sum())))
    assert torch.equal(r.grad[~beyond], -a[~beyond])


@SETTINGS
@given(eps=st.floats(0.01, 0.99), mag=st.floats(0.01, 3.0))
def test_exactly_at_the_boundary_the_gradient_is_unclipped(eps, mag):
    # r exactly on the bound (the bound rounds to float32 like the ratio) with the
    # advantage sign that clips beyond it
    upper = torch.tensor([1.0 + eps], dtype=torch.float32)
    lower = torch.tensor([1.0 - eps], dtype=torch.float32)
    for bound, adv in ((upper, mag), (lower, -mag)):
        r = bound.clone().requires_grad_(True)
        a = torch.tensor([adv])
        clipped_surrogate(r, a, eps).sum().backward()
        assert not bool(clip_active(r.detach(), a, eps))
        assert torch.equal(r.grad, -a)
        # a hair beyond the bound the gradient is zero
        beyond = torch.nextafter(bound, bound + (1.0 if adv > 0 else -1.0)).requires_grad_(True)
        clipped_surrogate(beyond, a, eps).sum().backward()
        assert torch.equal(beyond.grad, torch.zeros(1))


# ----------------------------------------------------------------------------- (f)


def groups_strategy():
    return st.lists(st.integers(2, 6), min_size=1, max_size=4).flatmap(
        lambda sizes: st.tuples(
            st.just(sizes),
            st.lists(st.integers(-50, 50), min_size=sum(sizes), max_size=sum(sizes)),
            st.permutations(list(range(sum(sizes)))),
        )
    )


@SETTINGS
@given(data=groups_strategy(), shift=st.floats(-100, 100), scale=st.floats(0.5, 50))
def test_group_advantages(data, shift, scale):
    sizes, values, perm = data
    ids = torch.tensor([g for g, n in enumerate(sizes) for _ in range(n)])[torch.tensor(perm)]
    rewards = torch.tensor(values, dtype=torch.float32)
    adv = group_advantages(rewards, ids)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    for g in range(len(sizes)):
        sel = ids == g
        ag, rg = adv[sel].double(), rewards[sel].double()
        assert abs(float(ag.mean())) < 1e-5
        spread = float(rg.std(unbiased=False))
        if spread == 0:
            assert torch.equal(adv[sel], torch.zeros(int(sel.sum())))
        else:
            # unit std up to the eps of the denominator (rewards are integers: spread >= 0.35)
            assert float(ag.std(unbiased=False)) == pytest.approx(spread / (spread + 1e-4), abs=1e-5)
            assert float(ag.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    # invariance to a shift and a positive scale of the rewards
    moved = group_advantages(rewards.double() * scale + shift, ids)
    assert torch.allclose(moved, adv, atol=1e-3)
    # equivariance to the order of the batch
    p = torch.tensor(perm)
    assert torch.allclose(group_advantages(rewards[p], ids[p]), adv[p], atol=1e-6)
