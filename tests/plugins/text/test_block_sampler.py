"""The ``block`` sampler on a tiny ``llada``: LLaDA's semi-autoregressive order and
counts, greedy and random re-masking, guidance, the end-of-sequence rule, exact
replays, and Co-GRPO's and MaskGRPO's objectives (and a learned schedule) on its
trajectories."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdmrl import options as opts
from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext, Policies
from mdmrl_plugins.text.block import BlockOptions, BlockSampler, block_log_probs, keep_in_block
from mdmrl_plugins.text.schedules import LLaDASchedule, LLaDAScheduleOptions

#: the tiny backbone's completion length (conftest.py) and the block length used here
N, BLOCK = 12, 4
PROMPTS = ["What is 2 + 3?", "Tom has 3 apples.", "What is 2 + 3?"]


def _schedule(**options) -> LLaDASchedule:
    return LLaDASchedule(LLaDAScheduleOptions(**{"temperature": 1.0, **options}))


def _sample(bb, steps=6, sampler=None, schedule=None, prompts=PROMPTS, seeds=None):
    sampler = sampler or BlockSampler(BlockOptions(block_length=BLOCK))
    seeds = torch.arange(len(prompts)) + 11 if seeds is None else seeds
    return sampler.sample(bb, schedule or _schedule(), prompts, steps, seeds)


def _step_blocks(traj, block: int) -> list[set[int]]:
    """For every step, the blocks it fills."""
    return [set((traj.filled[:, t].nonzero()[:, 1] // block).tolist()) for t in range(traj.num_steps)]


# ------------------------------------------------------------------ order and counts


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 3), st.integers(1, 4), st.data())
def test_blocks_fill_left_to_right_with_llada_counts(make_backbone, blocks, block, data):
    steps_per_block = data.draw(st.integers(1, block))
    n, steps = blocks * block, blocks * steps_per_block
    bb = make_backbone(gen_length=n)
    sampler = BlockSampler(BlockOptions(block_length=block))
    traj = _sample(bb, steps, sampler, prompts=PROMPTS[:2])
    traj.validate(bb.mask_token_id)
    counts = traj.filled.sum(-1)  # [B, T]
    assert bool((counts >= 1).all())
    for t in range(steps):
        b = t // steps_per_block
        assert _step_blocks(traj, block)[t] == {b}  # step t works on block t // k only
        later = traj.tokens[:, t + 1, (b + 1) * block :]
        assert bool((later == bb.mask_token_id).all())  # the later blocks wait
        if t % steps_per_block == steps_per_block - 1:  # a block is finished after its k steps
            assert not bool((traj.tokens[:, t + 1, : (b + 1) * block] == bb.mask_token_id).any())
    if block % steps_per_block == 0:  # LLaDA's counts: the block split evenly over its steps
        assert bool((counts == block // steps_per_block).all())


def test_keep_in_block_clamps_so_every_step_reveals():
    # the linear schedule's ratio after step 0 of 4 on a 12-token completion in 3 blocks of 4
    assert keep_in_block([1 - 1 / 4], [4], 8, 12, 0, 1) == [0]  # a block's last step reveals all
    assert keep_in_block([1 - 1 / 12], [4], 8, 12, 0, 4) == [3]
    assert keep_in_block([1.0], [4], 8, 12, 0, 4) == [3]  # keep at most masked - 1
    assert keep_in_block([0.0], [4], 8, 12, 0, 4) == [3]  # and at least one per remaining step
    assert keep_in_block([0.0], [4], 8, 12, 2, 4) == [1]
    assert keep_in_block([math.nan], [3], 0, 12, 1, 4) == [2]


def test_temperature_zero_is_greedy_and_low_confidence_reveals_the_most_likely(make_backbone):
    bb = make_backbone()
    traj = _sample(bb, 6, schedule=_schedule(temperature=0.0))  # 3 blocks x 2 steps: 2 per step
    with torch.no_grad():
        start = torch.full((3, N), bb.mask_token_id)
        logits = bb(start, bb.encode_prompts(PROMPTS), torch.ones(3)).logits[:, :BLOCK]
    logits[..., bb.mask_token_id] = -math.inf
    best = logits.log_softmax(-1).max(-1)
    top = best.values.topk(2, dim=-1).indices  # the two positions whose best token is most likely
    revealed = traj.filled[:, 0, :BLOCK]
    assert bool((revealed.sum(-1) == 2).all())
    for row in range(3):
        assert set(revealed[row].nonzero()[:, 0].tolist()) == set(top[row].tolist())
        assert torch.equal(traj.tokens[row, 1, :BLOCK][revealed[row]], best.indices[row][revealed[row]])
    again = _sample(bb, 6, schedule=_schedule(temperature=0.0), seeds=torch.tensor([5, 6, 7]))
    assert torch.equal(again.final_tokens, traj.final_tokens)  # greedy: no randomness left


def test_random_remasking_reveals_random_positions(make_backbone):
    bb = make_backbone()
    rand = BlockSampler(BlockOptions(block_length=BLOCK, remasking="random"))
    seen = set()
    for s in range(12):
        traj = _sample(bb, 6, rand, _schedule(temperature=0.0), PROMPTS[:1], torch.tensor([s]))
        assert int(traj.filled[0, 0].sum()) == 2
        seen.add(tuple(traj.filled[0, 0, :BLOCK].nonzero()[:, 0].tolist()))
    assert len(seen) >= 4  # greedy tokens, but the revealed pairs vary with the seed


def test_the_mask_token_is_never_emitted(make_backbone):
    bb = make_backbone()
    forward = bb.forward

    def favour_mask(tokens, cond, timestep):
        out = forward(tokens, cond, timestep)
        out.logits[..., bb.mask_token_id] += 100.0
        return out

    bb.forward = favour_mask
    traj = _sample(bb, 6)
    traj.validate(bb.mask_token_id)
    assert bool(torch.isfinite(traj.model_log_probs).all())


def test_guidance_mixes_conditional_and_unconditional_logits(make_backbone):
    bb = make_backbone()
    sizes = []
    forward = bb.forward

    def spy(tokens, cond, timestep):
        sizes.append(tokens.shape[0])
        return forward(tokens, cond, timestep)

    bb.forward = spy
    traj = _sample(bb, 6, schedule=_schedule(temperature=0.0, cfg_scale=2.0))
    assert sizes == [6] * 6  # cond and uncond rows in one forward at every step
    sizes.clear()
    _sample(bb, 6, schedule=_schedule(temperature=0.0))
    assert sizes == [3] * 6  # s = 1: the conditional rows alone
    with torch.no_grad():
        start = torch.full((3, N), bb.mask_token_id)
        c = forward(start, bb.encode_prompts(PROMPTS), torch.ones(3)).logits[:, :BLOCK]
        u = forward(start, bb.null_conditioning(3), torch.ones(3)).logits[:, :BLOCK]
    guided = u + 2.0 * (c - u)
    guided[..., bb.mask_token_id] = -math.inf
    revealed = traj.filled[:, 0, :BLOCK]
    assert torch.equal(traj.tokens[:, 1, :BLOCK][revealed], guided.argmax(-1)[revealed])


# ------------------------------------------------------------------ log-probs and replay


@pytest.mark.parametrize(
    "schedule_options, remasking",
    [
        ({}, "low_confidence"),
        ({"temperature": 0.7, "remask_temperature": 0.5}, "low_confidence"),
        ({"temperature": 1.3, "cfg_scale": 2.5}, "random"),
    ],
)
def test_replay_reproduces_the_recorded_log_probs_bit_for_bit(make_backbone, schedule_options, remasking):
    bb = make_backbone()
    sampler = BlockSampler(BlockOptions(block_length=BLOCK, remasking=remasking))
    schedule = _schedule(**schedule_options)
    traj = _sample(bb, 6, sampler, schedule)
    cond, uncond = bb.encode_prompts(PROMPTS), bb.null_conditioning(3)
    for t in range(traj.num_steps):
        rep = sampler.replay_step(bb, traj, t, cond, uncond)
        assert torch.equal(rep.model_log_prob, traj.model_log_probs[:, t]), t
        assert rep.features.shape == (3, N, bb.feature_dim)
    # the recorded value is the sum over the revealed tokens of log softmax(guided / tau)
    with torch.no_grad():
        start = traj.tokens[:, 0]
        out = bb(start, cond, torch.ones(3))
        u = bb(start, uncond, torch.ones(3)).logits if schedule_options.get("cfg_scale", 1.0) != 1.0 else None
    lp, _ = block_log_probs(out.logits, u, traj.actions[:, 0], 0, BLOCK, bb.mask_token_id)
    picked = lp.gather(-1, traj.tokens[:, 1, :BLOCK].clamp_max(lp.shape[-1] - 1)[..., None])[..., 0]
    expected = torch.where(traj.filled[:, 0, :BLOCK], picked, 0.0).sum(-1)
    torch.testing.assert_close(traj.model_log_probs[:, 0], expected, atol=1e-5, rtol=1e-5)


def test_a_trajectory_depends_only_on_its_seed(make_backbone):
    bb = make_backbone()
    prompts = ["What is 2 + 3?"] * 3
    batch = _sample(bb, 6, prompts=prompts, seeds=torch.tensor([4, 5, 6]))
    alone = _sample(bb, 6, prompts=prompts[:1], seeds=torch.tensor([5]))
    assert torch.equal(alone.tokens[0], batch.tokens[1])
    assert not torch.equal(batch.final_tokens[0], batch.final_tokens[1])


def test_positions_after_the_first_end_of_sequence_are_left_out(make_backbone, tokenizer):
    bb = make_backbone()
    eos = bb.pad_token_id
    forward = bb.forward

    def eos_at_five(tokens, cond, timestep):
        out = forward(tokens, cond, timestep)
        out.logits[:, 5, eos] += 50.0
        return out

    bb.forward = eos_at_five
    keep = BlockSampler(BlockOptions(block_length=BLOCK, eos_padding=False))
    pad = BlockSampler(BlockOptions(block_length=BLOCK))
    traj = _sample(bb, N, pad)  # one token per step
    assert bool((traj.final_tokens[:, 5] == eos).all())
    assert not bool(torch.isin(traj.final_tokens[:, :5], torch.tensor(bb.eos_token_ids)).any())
    cond, uncond = bb.encode_prompts(PROMPTS), bb.null_conditioning(3)
    for t in range(N):
        full = keep.replay_step(bb, traj, t, cond, uncond).model_log_prob
        assert torch.equal(
            pad.replay_step(bb, traj, t, cond, uncond).model_log_prob, traj.model_log_probs[:, t]
        )
        position = traj.filled[:, t].float().argmax(-1)  # the one position step t reveals, per row
        expect = torch.where(position <= 5, full, torch.zeros_like(full))
        assert torch.equal(traj.model_log_probs[:, t], expect), t
    assert bool((full < 0).all())


# ------------------------------------------------------------------ errors and options


def test_geometry_errors_are_one_line(make_backbone):
    bb = make_backbone()
    with pytest.raises(UserError) as err:
        _sample(bb, 7)  # 3 blocks
    assert "sampler.steps: 7" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="at most 4 steps per block"):
        _sample(bb, 15)
    with pytest.raises(UserError, match="block_length: 5 does not divide the completion length 12"):
        BlockSampler.from_options(BlockOptions(block_length=5), BuildContext(backbone=bb))
    problems: list[str] = []
    opts.build(BlockOptions, {"gen_length": 10, "block_length": 4}, "sampler.options", problems)
    opts.build(BlockOptions, {"remasking": "confident"}, "sampler.options", problems)
    assert len(problems) == 2 and "block_length" in problems[0] and "remasking" in problems[1]


def test_gen_length_option_overrides_the_backbone_canvas(make_backbone):
    bb = make_backbone()
    traj = _sample(bb, 4, BlockSampler(BlockOptions(gen_length=8, block_length=BLOCK)))
    assert traj.tokens.shape == (3, 5, 8)


def test_llada_schedule_is_linear():
    sched = LLaDASchedule(LLaDAScheduleOptions(temperature=0.5, cfg_scale=1.5, remask_temperature=0.2))
    for t in range(8):
        a, raw, logp = sched.act(t, 8, 2, None, None)
        assert a[0].tolist() == pytest.approx([0.5, 1 - (t + 1) / 8, 0.2, 1.5])
        assert torch.equal(a, raw) and not bool(logp.any())
    assert sched.guidance_free(0, 8) is False and LLaDASchedule().guidance_free(0, 8) is True
    problems: list[str] = []
    opts.build(LLaDAScheduleOptions, {"temperature": -1.0}, "schedule.options", problems)
    assert len(problems) == 1


# ------------------------------------------------------------------ objectives on block trajectories


def _policies(bb, schedule, sampler, prompts=PROMPTS):
    return Policies(bb, schedule, sampler, bb.encode_prompts(prompts), bb.null_conditioning(len(prompts)))


def test_cogrpo_objective_trains_llada_on_block_trajectories(make_backbone):
    from mdmrl_plugins.cogrpo.objective import GRPOObjective

    bb = make_backbone().train()
    sampler, schedule = BlockSampler(BlockOptions(block_length=BLOCK)), _schedule(cfg_scale=1.5)
    traj = _sample(bb, 6, sampler, schedule)
    out = GRPOObjective().loss(
        _policies(bb, schedule, sampler), traj, torch.tensor([1.0, -0.5, -0.5]), [0, 3, 5], "model"
    )
    assert out.stats["ratio_min"] == out.stats["ratio_max"] == 1.0  # on-policy, exactly
    out.loss.backward()
    grads = [p.grad for p in bb.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("remask", ["random", "ar-fading"])
def test_maskgrpo_objective_trains_llada_on_block_trajectories(make_backbone, remask):
    from mdmrl_plugins.maskgrpo.objective import MaskGRPOObjective, MaskGRPOOptions

    bb = make_backbone().train()
    sampler, schedule = BlockSampler(BlockOptions(block_length=BLOCK)), _schedule()
    traj = _sample(bb, 6, sampler, schedule)
    obj = MaskGRPOObjective.from_options(
        MaskGRPOOptions(mu=3, remask=remask, guidance="conditional"), BuildContext(backbone=bb)
    )
    assert obj.gamma == 0.6 and obj.remask_name == remask  # the text default of gamma
    with torch.no_grad():
        obj.prepare(_policies(bb, schedule, sampler), traj)
    for term in range(3):
        bb.zero_grad()
        out = obj.loss(
            _policies(bb, schedule, sampler), traj, torch.tensor([1.0, -0.5, -0.5]), [term], "model"
        )
        assert out.stats["ratio_min"] == out.stats["ratio_max"] == 1.0
        out.loss.backward()
        assert sum(float(p.grad.abs().sum()) for p in bb.parameters() if p.grad is not None) > 0


def test_a_learned_schedule_runs_on_text(make_backbone):
    """Co-GRPO's Gaussian schedule over temperature, tokens revealed per step and
    re-mask temperature, on LLaDA with the block sampler."""
    from mdmrl_plugins.cogrpo.gaussian import GaussianOptions, GaussianSchedule
    from mdmrl_plugins.cogrpo.objective import GRPOObjective

    bb = make_backbone().train()
    options = GaussianOptions(
        base="llada",
        base_options={"temperature": 1.0, "remask_temperature": 0.5},
        sigma=0.5,
        trainable=["temperature", "remask_ratio", "remask_temperature"],
        hidden=8,
    )
    schedule = GaussianSchedule.from_options(options, BuildContext(backbone=bb))
    sampler = BlockSampler(BlockOptions(block_length=BLOCK))
    prompts = PROMPTS * 2
    traj = _sample(bb, 6, sampler, schedule, prompts, torch.arange(6))  # 2 steps per 4-token block
    traj.validate(bb.mask_token_id)
    assert float(traj.actions[:, :, 0].std()) > 0.05 and float(traj.actions[:, :, 2].std()) > 0.05
    counts = traj.filled.sum(-1)  # the sampled ratios move reveals between a block's steps
    assert len({tuple(c) for c in counts.tolist()}) > 1

    out = GRPOObjective().loss(
        _policies(bb, schedule, sampler, prompts), traj, torch.linspace(-1, 1, 6), [0, 3, 5], "joint"
    )
    assert abs(out.stats["ratio_min"] - 1.0) < 1e-5 and abs(out.stats["ratio_max"] - 1.0) < 1e-5
    out.loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in schedule.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in bb.parameters())


def test_text_plugin_registers_its_parts():
    from mdmrl.plugins import Registry
    from mdmrl_plugins.text import plugin

    reg = Registry()
    reg.register_plugin(plugin, "text")
    assert reg.get("sampler", "block").cls is BlockSampler
    assert reg.get("schedule", "llada").cls is LLaDASchedule
    for kind, name in [
        ("rewarder", "gsm8k-correct"),
        ("rewarder", "gsm8k-format"),
        ("rewarder", "gsm8k-integer"),
        ("prompts", "gsm8k"),
    ]:
        assert reg.get(kind, name).cls.name == name
