"""The confidence re-mask sampler (Co-GRPO Eq. 2-5) and its replay (Eq. 8/19)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toys import FixedLogits, Scripted, TinyBackbone, TinyOptions

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext
from mdmrl.options import build
from mdmrl.plugins import get_registry
from mdmrl_plugins.cogrpo.gaussian import GaussianOptions, GaussianSchedule
from mdmrl_plugins.cogrpo.sampler import (
    ConfidenceOptions,
    ConfidenceSampler,
    filled_log_prob,
    guided_log_probs,
    keep_masked_counts,
    lowest_confidence_mask,
    masked_fraction,
)
from mdmrl_plugins.cogrpo.schedules import FIXED_SCHEDULES, MeissonicSchedule

MODES = ["per_sample", "shared"]


def tiny(h=3, w=4, v=5, dim=8, seed=0):
    return TinyBackbone(TinyOptions(codebook_size=v, height=h, width=w, dim=dim, seed=seed))


def masked_counts(traj, mask):
    return (traj.tokens == mask).sum(-1)  # [B, T+1]


# --------------------------------------------------------------------------- validity


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    data=st.data(),
    sched=st.sampled_from(FIXED_SCHEDULES),
    rng=st.sampled_from(MODES),
    rounding=st.sampled_from(["ceil", "floor"]),
)
def test_trajectories_are_valid(b, h, w, data, sched, rng, rounding):
    n = h * w
    T = data.draw(st.integers(1, min(n, 6)))
    bb = tiny(h, w)
    sampler = ConfidenceSampler(ConfidenceOptions(rng=rng, rounding=rounding))
    traj = sampler.sample(bb, sched(), [f"p{i % 2}" for i in range(b)], T, torch.arange(b) + 5)
    traj.validate(bb.mask_token_id)
    counts = masked_counts(traj, bb.mask_token_id)
    assert bool((counts[:, 0] == n).all()) and bool((counts[:, -1] == 0).all())
    assert bool((counts[:, 1:] < counts[:, :-1]).all())  # every step decodes at least one token
    assert torch.equal(traj.filled.sum(1), torch.ones(b, n, dtype=torch.long))  # filled exactly once
    assert torch.equal(traj.filled[:, -1], traj.tokens[:, -2] == bb.mask_token_id)  # last step decodes all
    assert bool((traj.tokens[:, -1] < bb.codebook_size).all())
    assert bool((traj.model_log_probs <= 0).all()) and bool(torch.isfinite(traj.model_log_probs).all())
    assert torch.equal(traj.schedule_log_probs, torch.zeros(b, T))
    assert torch.equal(traj.actions, traj.raw_actions)
    assert traj.group_ids.tolist() == [i % 2 for i in range(b)]  # one id per distinct prompt


def test_too_many_steps_is_a_user_error():
    with pytest.raises(UserError, match="sampler.steps"):
        ConfidenceSampler().sample(tiny(2, 2), MeissonicSchedule(), ["a"], 5, torch.tensor([0]))


def test_options_are_validated():
    problems: list[str] = []
    build(ConfidenceOptions, {"rng": "global", "rounding": "round"}, "sampler.options", problems)
    assert len(problems) == 2
    assert get_registry().get("sampler", "confidence").cls is ConfidenceSampler
    assert isinstance(ConfidenceSampler.from_options(ConfidenceOptions(), BuildContext()), ConfidenceSampler)


# --------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("rng", MODES)
def test_same_seeds_same_trajectories(rng):
    bb, sampler = tiny(), ConfidenceSampler(ConfidenceOptions(rng=rng))
    a = sampler.sample(bb, MeissonicSchedule(), ["x y", "z"], 4, torch.tensor([3, 4]))
    b = sampler.sample(bb, MeissonicSchedule(), ["x y", "z"], 4, torch.tensor([3, 4]))
    for f in ("tokens", "filled", "actions", "model_log_probs", "schedule_log_probs", "seeds"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    c = sampler.sample(bb, MeissonicSchedule(), ["x y", "z"], 4, torch.tensor([30, 40]))
    assert not torch.equal(a.tokens, c.tokens)


def gaussian(bb):
    return GaussianSchedule(
        GaussianOptions(sigma=0.3), bb.feature_dim, bb.grid_shape, MeissonicSchedule(), hidden=8
    )


@pytest.mark.parametrize("learned", [False, True])
def test_per_sample_trajectory_is_the_same_alone_or_in_a_batch(learned):
    bb = tiny(4, 4, v=6)
    torch.manual_seed(0)
    sched = gaussian(bb) if learned else MeissonicSchedule()
    if learned:  # a non-zero policy head, so the features matter
        torch.nn.init.normal_(sched.net.fc2.weight, std=0.5)
    sampler = ConfidenceSampler()
    batch = sampler.sample(bb, sched, ["red", "blue", "green big"], 5, torch.tensor([11, 12, 13]))
    for i, (p, s) in enumerate(zip(["red", "blue", "green big"], [11, 12, 13])):
        alone = sampler.sample(bb, sched, [p], 5, torch.tensor([s]))
        assert torch.equal(alone.tokens[0], batch.tokens[i])
        assert torch.equal(alone.raw_actions[0], batch.raw_actions[i])
        assert torch.allclose(alone.model_log_probs[0], batch.model_log_probs[i], atol=1e-5)
        assert torch.allclose(alone.schedule_log_probs[0], batch.schedule_log_probs[i], atol=1e-5)
    # reordering the batch does not change a trajectory either
    rev = sampler.sample(bb, sched, ["green big", "blue", "red"], 5, torch.tensor([13, 12, 11]))
    assert torch.equal(rev.tokens.flip(0), batch.tokens)


def test_learned_schedule_actions_are_recorded_with_their_log_prob():
    bb = tiny(4, 4, v=6)
    sched = gaussian(bb)
    traj = ConfidenceSampler().sample(bb, sched, ["a", "b"], 4, torch.tensor([1, 2]))
    assert not torch.equal(traj.actions, traj.raw_actions)
    assert bool((traj.schedule_log_probs != 0).all())
    cond, uncond = bb.encode_prompts(traj.prompts), bb.null_conditioning(2)
    for t in range(4):  # the features the policy saw are those the replay returns
        rep = ConfidenceSampler().replay_step(bb, traj, t, cond, uncond)
        lp = sched.log_prob(t, 4, rep.features, traj.raw_actions[:, t])
        assert torch.allclose(lp, traj.schedule_log_probs[:, t], atol=1e-5)


# --------------------------------------------------------------------------- re-masking


# allowed tokens per position: p(sampled) = 1 / m_i whatever token is drawn
ALLOWED = [3, 1, 8, 2, 6, 4, 7, 5]


def allowed_logits():
    n, v = len(ALLOWED), max(ALLOWED)
    logits = torch.full((n, v), -1e4)
    for i, m in enumerate(ALLOWED):
        logits[i, :m] = 0.0
    return logits


@pytest.mark.parametrize("rng", MODES)
@pytest.mark.parametrize("keep", [1, 3, 6])
def test_the_lowest_confidence_positions_are_remasked(rng, keep):
    bb = FixedLogits(allowed_logits())
    n = len(ALLOWED)
    sched = Scripted(lambda t, T: [1.0, keep / n, 0.0, 1.0])  # tau_r = 0: confidence = -log m_i
    traj = ConfidenceSampler(ConfidenceOptions(rng=rng)).sample(
        bb, sched, ["p", "q"], 2, torch.tensor([0, 1])
    )
    still_masked = (traj.tokens[:, 1] == bb.mask_token_id)[0].nonzero().flatten().tolist()
    want = sorted(sorted(range(n), key=lambda i: -ALLOWED[i])[:keep])  # largest m_i = lowest confidence
    assert still_masked == want
    for i in range(n):  # sampled tokens are among the allowed ones
        assert int(traj.tokens[0, -1, i]) < ALLOWED[i]


def test_remask_noise_scale_randomises_the_choice():
    bb = FixedLogits(allowed_logits())
    sched = Scripted(lambda t, T: [1.0, 3 / 8, 50.0, 1.0])  # noise dominates the confidence
    sampler = ConfidenceSampler()
    sets = {
        tuple(
            (sampler.sample(bb, sched, ["p"], 2, torch.tensor([s])).tokens[0, 1] == 8)
            .nonzero()
            .flatten()
            .tolist()
        )
        for s in range(12)
    }
    assert len(sets) > 3 and all(len(s) == 3 for s in sets)


def test_lowest_confidence_mask_unit():
    conf = torch.tensor([[0.5, -1.0, float("inf"), -1.0, 2.0], [3.0, 2.0, 1.0, 0.0, -1.0]])
    got = lowest_confidence_mask(conf, torch.tensor([2, 4]))
    assert got.tolist() == [[False, True, False, True, False], [False, True, True, True, True]]
    assert lowest_confidence_mask(conf, torch.tensor([0, 0])).sum() == 0


@pytest.mark.parametrize("rounding", ["ceil", "floor"])
def test_keep_counts_round_and_clamp(rounding):
    # step 1 of 4: at least T - 1 - t = 2 stay masked, at most masked - 1
    ratio = [0.25, 0.25, 1.0, 0.0, 0.99, 1.5, -0.5, math.nan]
    masked = [10, 3, 10, 10, 10, 10, 10, 10]
    k = keep_masked_counts(ratio, masked, step=1, num_steps=4, num_tokens=10, rounding=rounding)
    want = [3, 2, 9, 2, 9, 9, 2, 2] if rounding == "ceil" else [2, 2, 9, 2, 9, 9, 2, 2]
    assert k == want


def keep_counts_in_float32(ratio, num_masked, step, num_steps, num_tokens, rounding):
    """The count rule computed with float32 tensors: the reference for the host version."""
    x = torch.tensor(ratio, dtype=torch.float32).clamp(0.0, 1.0) * num_tokens
    k = (torch.ceil(x) if rounding == "ceil" else torch.floor(x)).to(torch.long)
    k = torch.where(torch.isnan(x), num_steps - 1 - step, k)
    return torch.minimum(k, torch.tensor(num_masked) - 1).clamp_min(num_steps - 1 - step).tolist()


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 4096),
    raw=st.lists(st.floats(-0.125, 1.125, width=32), min_size=1, max_size=8),
    data=st.data(),
    rounding=st.sampled_from(["ceil", "floor"]),
)
def test_keep_counts_on_the_host_round_as_float32_does(n, raw, data, rounding):
    """r N is rounded to float32 before ceil/floor: a ratio whose exact product lies
    just above an integer but rounds onto it keeps that integer, as on the device."""
    num_steps = data.draw(st.integers(1, max(1, min(n, 64))))
    step = data.draw(st.integers(0, num_steps - 1))
    masked = [data.draw(st.integers(num_steps - step, n)) for _ in raw]
    # ratios near k / N, where the float32 rounding of r N decides the count
    near = [float(torch.tensor(round(r * n) / n, dtype=torch.float32)) for r in raw]
    for ratios in (raw, near):
        got = keep_masked_counts(ratios, masked, step, num_steps, n, rounding)
        assert got == keep_counts_in_float32(ratios, masked, step, num_steps, n, rounding)


@pytest.mark.parametrize("rng", MODES)
def test_forward_timesteps_are_the_masked_fraction_of_the_tokens(rng):
    """The sampler tracks the masked positions and their count through the re-mask
    selection; the timestep it passes must be masked_fraction of the tokens it passes,
    bit for bit, as the replay computes it."""
    bb = tiny(4, 5, v=7)
    calls = []
    forward = bb.forward

    def record(tokens, cond, timestep):
        calls.append((tokens.clone(), timestep.clone()))
        return forward(tokens, cond, timestep)

    bb.forward = record
    sched = Scripted(lambda t, T: [0.7, [0.9, 0.55, 0.3, 0.1, 0.0][t], 1.0, [2.0, 1.0, 3.0, 1.0, 2.0][t]])
    traj = ConfidenceSampler(ConfidenceOptions(rng=rng)).sample(
        bb, sched, ["a", "b c"], 5, torch.tensor([1, 2])
    )
    # a 2B forward per step, and a B-row one again at the two undeclared s = 1 steps
    assert [c[0].shape[0] for c in calls] == [4, 4, 2, 4, 4, 2, 4]
    steps = [0, 1, 1, 2, 3, 3, 4]
    for t, (tokens, timestep) in zip(steps, calls):
        assert torch.equal(tokens[-2:], traj.tokens[:, t])  # the conditional rows come last
        assert timestep.dtype == torch.float32
        assert torch.equal(timestep, masked_fraction(tokens, bb.mask_token_id))


@pytest.mark.parametrize("rng", MODES)
def test_clamp_at_extreme_ratios(rng):
    bb, T = tiny(3, 4), 5
    n, mask = bb.num_tokens, bb.mask_token_id
    sampler = ConfidenceSampler(ConfidenceOptions(rng=rng))
    ones = sampler.sample(bb, Scripted(lambda t, T: [1.0, 1.0, 1.0, 2.0]), ["a"], T, torch.tensor([0]))
    assert masked_counts(ones, mask)[0].tolist() == [n, n - 1, n - 2, n - 3, n - 4, 0]  # one per step
    zeros = sampler.sample(bb, Scripted(lambda t, T: [1.0, 0.0, 1.0, 2.0]), ["a"], T, torch.tensor([0]))
    assert masked_counts(zeros, mask)[0].tolist() == [n, 4, 3, 2, 1, 0]  # all but one per later step


# --------------------------------------------------------------------------- log-probs and replay


@pytest.mark.parametrize("rng", MODES)
def test_replay_equals_recorded_log_probs_exactly(rng):
    bb = tiny(4, 4, v=7, dim=16)
    sampler = ConfidenceSampler(ConfidenceOptions(rng=rng))
    prompts = ["a b", "c", "a b"]
    traj = sampler.sample(bb, MeissonicSchedule(), prompts, 5, torch.tensor([1, 2, 3]))
    cond, uncond = bb.encode_prompts(prompts), bb.null_conditioning(3)
    for t in range(5):
        with torch.no_grad():
            rep = sampler.replay_step(bb, traj, t, cond, uncond)
        assert torch.equal(rep.model_log_prob, traj.model_log_probs[:, t])
        assert rep.features.shape == (3, bb.num_tokens, bb.feature_dim) and not rep.features.requires_grad
        live_cond, live_uncond = bb.encode_prompts(prompts), bb.null_conditioning(3)
        live = sampler.replay_step(bb, traj, t, live_cond, live_uncond)  # with gradients
        assert torch.equal(live.model_log_prob.detach(), traj.model_log_probs[:, t])
        live.model_log_prob.sum().backward()
    assert bb.head.weight.grad is not None and bool(bb.head.weight.grad.abs().sum() > 0)


def test_replay_follows_the_current_backbone():
    bb = tiny(4, 4, v=7, dim=16)
    sampler = ConfidenceSampler()
    traj = sampler.sample(bb, MeissonicSchedule(), ["a"], 3, torch.tensor([1]))
    with torch.no_grad():
        bb.head.bias.add_(torch.linspace(-1, 1, 7))
        rep = sampler.replay_step(bb, traj, 0, bb.encode_prompts(["a"]), bb.null_conditioning(1))
    assert not torch.allclose(rep.model_log_prob, traj.model_log_probs[:, 0])


def test_guided_log_probs_is_the_cfg_formula():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    act = torch.tensor([[0.5, 0.3, 1.0, 3.0], [2.0, 0.3, 1.0, 0.0]])
    got = guided_log_probs(c, u, act)
    want0 = torch.log_softmax((u[0] + 3.0 * (c[0] - u[0])) / 0.5, -1)
    assert torch.allclose(got[0], want0, atol=1e-6)
    assert torch.allclose(got[1], torch.log_softmax(u[1] / 2.0, -1), atol=1e-6)  # s = 0: unconditional
    nxt = torch.tensor([[1, 5, 2], [0, 0, 4]])
    fill = torch.tensor([[True, False, True], [False, False, True]])
    lp = filled_log_prob(got, nxt, fill)
    assert torch.allclose(lp, torch.stack([got[0, 0, 1] + got[0, 2, 2], got[1, 2, 4]]))


def test_cfg_uses_the_conditional_and_unconditional_halves_correctly():
    n, v = 6, 3
    cond = torch.full((n, v), -1e4)
    cond[:, 1] = 0.0  # the prompt's model always says token 1
    uncond = torch.full((n, v), -1e4)
    uncond[:, 0] = 0.0  # the null prompt's model always says token 0
    bb = FixedLogits(cond, uncond)
    sampler = ConfidenceSampler()
    for s, token in [(1.0, 1), (0.0, 0), (5.0, 1)]:
        traj = sampler.sample(bb, Scripted(lambda t, T, s=s: [1.0, 0.5, 1.0, s]), ["p"], 3, torch.tensor([0]))
        assert traj.final_tokens.tolist() == [[token] * n]


def test_recorded_log_probs_are_those_of_the_guided_tempered_distribution():
    g = torch.Generator().manual_seed(3)
    c, u = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    bb = FixedLogits(c, u)
    act = [0.7, 0.5, 1.0, 2.5]
    traj = ConfidenceSampler().sample(bb, Scripted(lambda t, T: act), ["p", "q"], 3, torch.tensor([4, 5]))
    logp = torch.log_softmax((u + 2.5 * (c - u)) / 0.7, -1)  # [N, V]
    for t in range(3):
        want = torch.stack(
            [
                sum(logp[i, traj.tokens[b, t + 1, i]] for i in range(6) if traj.filled[b, t, i])
                for b in range(2)
            ]
        )
        assert torch.allclose(traj.model_log_probs[:, t], want.float(), atol=1e-5)


@pytest.mark.parametrize("rng", MODES)
def test_tokens_follow_the_tempered_distribution(rng):
    logits = torch.tensor([1.5, 0.5, 0.0, -1.0])
    bb = FixedLogits(logits.expand(64, 4).clone(), grid=(8, 8))
    sampler = ConfidenceSampler(ConfidenceOptions(rng=rng))
    for tau in (0.1, 1.0, 4.0):
        sched = Scripted(lambda t, T, tau=tau: [tau, 0.0, 1.0, 1.0])
        traj = sampler.sample(bb, sched, ["p"] * 16, 1, torch.arange(16))
        freq = torch.bincount(traj.final_tokens.flatten(), minlength=4).float() / traj.final_tokens.numel()
        p = torch.softmax(logits / tau, -1)
        assert torch.allclose(freq, p, atol=0.06), (tau, freq, p)
    # colder is more concentrated on the mode
    cold = sampler.sample(bb, Scripted(lambda t, T: [0.1, 0.0, 1.0, 1.0]), ["p"] * 2, 1, torch.arange(2))
    hot = sampler.sample(bb, Scripted(lambda t, T: [4.0, 0.0, 1.0, 1.0]), ["p"] * 2, 1, torch.arange(2))
    assert (cold.final_tokens == 0).float().mean() > (hot.final_tokens == 0).float().mean()
    assert float(cold.model_log_probs.mean()) > float(hot.model_log_probs.mean())


def test_one_step_decodes_everything():
    bb = tiny()
    traj = ConfidenceSampler().sample(bb, MeissonicSchedule(), ["a"], 1, torch.tensor([9]))
    assert bool(traj.filled.all()) and traj.tokens.shape == (1, 2, bb.num_tokens)
    assert math.isfinite(float(traj.model_log_probs[0, 0]))


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_drawing_every_row_or_the_masked_rows_gives_the_same_trajectory(monkeypatch, tau):
    """For codebooks above DENSE_MAX_CODEBOOK the sampler draws on every row while most
    positions are masked and on the gathered masked rows after: the two must agree
    bit for bit, whichever it picks at each step."""
    import mdmrl_plugins.cogrpo.sampler as sampler_module

    bb = tiny(4, 6, v=sampler_module.DENSE_MAX_CODEBOOK + 32)
    sched = Scripted(lambda t, T: [tau, [0.8, 0.5, 0.2, 0.0][t], 1.0, 3.0])
    run = {}
    for fraction in (0.0, 2.0):  # every row at every step / the masked rows at every step
        monkeypatch.setattr(sampler_module, "DENSE_ROW_FRACTION", fraction)
        run[fraction] = ConfidenceSampler().sample(bb, sched, ["a", "b c", "d"], 4, torch.tensor([5, 6, 7]))
    for field in ("tokens", "filled", "model_log_probs"):
        assert torch.equal(getattr(run[0.0], field), getattr(run[2.0], field)), field
