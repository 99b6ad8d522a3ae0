"""MaskGRPO's text branch: the selectable re-mask functions (random and the AR-like
fading-out re-mask of Alg. 1), the modality defaults (gamma 0.6 and ar-fading for a
text backbone), identical masks for every policy, the on-policy ratio, and the
end-of-sequence rule in the ELBO."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdmrl.interfaces import BuildContext, Policies
from mdmrl_plugins.maskgrpo.objective import MaskGRPOObjective, MaskGRPOOptions, mask_levels, seeded_mask
from mdmrl_plugins.maskgrpo.text_remask import (
    ar_fading_mask,
    expected_masked_fraction,
    fading_keep_probabilities,
    random_mask,
    remask,
)

lengths = st.integers(1, 600)
levels = st.floats(0.0, 1.0, allow_nan=False)


# ------------------------------------------------------------------ Alg. 1


@settings(max_examples=60, deadline=None)
@given(length=lengths, level=levels)
def test_mask_probability_never_decreases_along_the_completion(length, level):
    mask_p = 1.0 - fading_keep_probabilities(length, level)
    assert bool((mask_p[1:] >= mask_p[:-1] - 1e-15).all())
    assert bool(((mask_p >= 0) & (mask_p <= 1)).all())
    if length > 1 and level < 1.0:
        assert mask_p[-1] == 1.0 and mask_p[0] < mask_p[-1]  # the last token is always masked


@settings(max_examples=60, deadline=None)
@given(length=lengths, level=levels)
def test_expected_masked_fraction_is_the_level_unless_clipped(length, level):
    keep = fading_keep_probabilities(length, level)
    unclipped = torch.linspace(1.0, 0.0, length, dtype=torch.float64)
    unclipped = unclipped * (1.0 - level) * length / unclipped.sum()
    expected = expected_masked_fraction(length, level)
    assert math.isclose(expected, float(1.0 - keep.mean()), abs_tol=1e-12)
    if float(unclipped.max()) <= 1.0:  # nothing clipped: exactly the level
        assert math.isclose(expected, level, abs_tol=1e-12)
    else:  # clipping keeps the first tokens always: more than the level is masked
        assert expected > level
    # the clip happens exactly below level 1/2 (sum(d) = L / 2, so q_0 = 2 (1 - t))
    if length >= 2:
        assert (float(unclipped.max()) > 1.0 + 1e-12) == (level < 0.5 - 1e-12)


def test_gamma_above_one_half_never_clips():
    for t in mask_levels(12, 0.6):
        for length in (1, 2, 17, 256):
            assert math.isclose(expected_masked_fraction(length, t), t, abs_tol=1e-12)


@pytest.mark.parametrize("level", [0.3, 0.6, 0.9])
def test_realised_masks_follow_the_probabilities(level):
    n, rows = 64, 400
    masked, expected = ar_fading_mask(torch.arange(rows), 1, level, n)
    target = expected_masked_fraction(n, level)
    assert torch.allclose(expected, torch.full((rows,), target))
    # the mean masked fraction over rows is within 4 standard errors of the expectation
    mask_p = 1.0 - fading_keep_probabilities(n, level)
    se = math.sqrt(float((mask_p * (1 - mask_p)).sum())) / n / math.sqrt(rows)
    assert abs(float(masked.float().mean()) - target) < 4 * se
    # and the late positions are masked more often than the early ones
    per_position = masked.float().mean(0)
    assert float(per_position[-16:].mean()) > float(per_position[:16].mean())


@settings(max_examples=30, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4),
    prompt=st.integers(0, 20),
    level=st.floats(0.05, 0.99),
    name=st.sampled_from(["random", "ar-fading"]),
)
def test_tokens_outside_the_completion_are_never_masked(seeds, prompt, level, name):
    n = 40
    eligible = torch.zeros(len(seeds), n, dtype=torch.bool)
    eligible[:, prompt:] = True  # a layout with the prompt in front of the completion
    masked, _ = remask(name, torch.tensor(seeds), 2, level, n, 0, eligible)
    assert not bool(masked[:, :prompt].any())
    again, _ = remask(name, torch.tensor(seeds), 2, level, n, 0, eligible)
    assert torch.equal(masked, again)
    if name == "ar-fading":  # the fading runs over the completion: its last token is always masked
        assert bool(masked[:, -1].all()) or n - prompt == 1


def test_random_is_the_image_branch_mask_and_masks_differ_by_seed_term_and_salt():
    seeds = torch.tensor([3, 4, 5])
    masked, level = random_mask(seeds, 2, 0.7, 30)
    assert torch.equal(masked, seeded_mask(seeds, 2, 0.7, 30))
    assert torch.equal(level, masked.float().mean(1))
    a, _ = ar_fading_mask(seeds, 1, 0.7, 30)
    assert not torch.equal(a, ar_fading_mask(seeds, 2, 0.7, 30)[0])
    assert not torch.equal(a, ar_fading_mask(seeds, 1, 0.7, 30, salt=1)[0])
    assert torch.equal(a[2], ar_fading_mask(seeds[2:], 1, 0.7, 30)[0][0])  # a row depends on its seed only
    with pytest.raises(ValueError, match="unknown re-mask"):
        remask("fading", seeds, 1, 0.7, 30)


# ------------------------------------------------------------------ the objective on a text backbone


@pytest.fixture(scope="module")
def tokenizer():
    from mdmrl_plugins.llada.tiny import byte_level_tokenizer

    return byte_level_tokenizer()


class Recording:
    """Wraps a backbone's forward to record the completions it is given."""

    def __init__(self, backbone):
        self.seen: list[torch.Tensor] = []
        forward = backbone.forward

        def record(tokens, cond, timestep):
            self.seen.append(tokens.detach().clone())
            return forward(tokens, cond, timestep)

        backbone.forward = record


def _rollout(tokenizer, seed=0):
    from mdmrl_plugins.llada.tiny import tiny_backbone
    from mdmrl_plugins.text.block import BlockOptions, BlockSampler
    from mdmrl_plugins.text.schedules import LLaDASchedule, LLaDAScheduleOptions

    bb = tiny_backbone(tokenizer, seed=seed, gen_length=16, max_prompt_length=40)
    sampler, schedule = BlockSampler(BlockOptions(block_length=8)), LLaDASchedule(LLaDAScheduleOptions(1.0))
    prompts = ["What is 2 + 3?", "Tom has 3 apples.", "Hi", "What is 2 + 3?"]
    traj = sampler.sample(bb, schedule, prompts, 4, torch.tensor([1, 2, 3, 4]))

    def policies():
        return Policies(bb, schedule, sampler, bb.encode_prompts(prompts), bb.null_conditioning(4))

    return bb, traj, policies


def test_text_backbones_default_to_gamma_0_6_and_ar_fading(tokenizer):
    from toys import TinyBackbone

    from mdmrl_plugins.llada.tiny import tiny_backbone

    text = MaskGRPOObjective.from_options(MaskGRPOOptions(), BuildContext(backbone=tiny_backbone(tokenizer)))
    image = MaskGRPOObjective.from_options(MaskGRPOOptions(), BuildContext(backbone=TinyBackbone()))
    assert (text.gamma, text.remask_name) == (0.6, "ar-fading")
    assert (image.gamma, image.remask_name) == (0.8, "random")
    assert text.levels == mask_levels(4, 0.6) and all(0.6 < t < 1 for t in text.levels)
    chosen = MaskGRPOObjective.from_options(
        MaskGRPOOptions(gamma=0.7, remask="random"), BuildContext(backbone=tiny_backbone(tokenizer))
    )
    assert (chosen.gamma, chosen.remask_name) == (0.7, "random")


@pytest.mark.parametrize("name", ["ar-fading", "random"])
def test_old_and_new_policy_see_identical_masks_and_the_ratio_is_exactly_one(tokenizer, name):
    bb, traj, policies = _rollout(tokenizer)
    obj = MaskGRPOObjective(MaskGRPOOptions(mu=3, remask=name, guidance="conditional"), text=True)
    rec = Recording(bb)
    with torch.no_grad():
        obj.prepare(policies(), traj)
    old = list(rec.seen)
    assert len(old) == 3
    for term in range(3):
        rec.seen.clear()
        bb.zero_grad()
        out = obj.loss(policies(), traj, torch.tensor([1.0, -1.0, 0.5, -0.5]), [term], "model")
        assert torch.equal(rec.seen[0], old[term])  # the new policy scores the same masked completion
        assert out.stats["ratio_min"] == out.stats["ratio_max"] == 1.0
        out.loss.backward()
        masked = old[term] == bb.mask_token_id
        expect, _ = remask(name, traj.seeds, term + 1, obj.levels[term], 16)
        assert torch.equal(masked, expect)
        assert out.stats["mask_frac"] == pytest.approx(obj.mask_fraction(term, 16))
    if name == "ar-fading":
        assert out.stats["mask_frac"] == pytest.approx(obj.levels[2])  # gamma >= 1/2: exactly the level


def test_the_elbo_reads_positions_after_the_first_eos_as_padding(tokenizer):
    bb, traj, policies = _rollout(tokenizer, seed=1)
    eos, pad = bb.eos_token_ids[-1], bb.pad_token_id
    ended = traj.final_tokens.clone()
    ended[:, 6] = eos
    junk, padded = ended.clone(), ended.clone()
    junk[:, 7:] = 40  # anything after the first EOS ...
    padded[:, 7:] = pad  # ... counts as padding
    obj = MaskGRPOObjective(MaskGRPOOptions(mu=2, guidance="conditional"), text=True)

    def elbo(final):
        tokens = traj.tokens.clone()
        tokens[:, -1] = final
        pol = policies()
        with torch.no_grad():
            return obj.elbo(bb, dataclasses.replace(traj, tokens=tokens), 1, pol.cond, pol.uncond)

    assert torch.equal(elbo(junk), elbo(padded))
    assert not torch.equal(elbo(junk), elbo(traj.final_tokens))
