"""The aMUSEd backbone's cached null conditioning, and the confidence sampler's fast
per_sample draws against diffusers' AmusedPipeline: other random numbers, the same
distribution."""

from __future__ import annotations

import pytest
import torch
from amused_tiny import CODEBOOK, tiny_modules
from test_amused import PROMPTS, amused_pipeline
from test_amused import tokenizer as tokenizer  # noqa: F401  (the module-scoped fixture)

from mdmrl_plugins.amused.backbone import AmusedBackbone
from mdmrl_plugins.cogrpo.sampler import ConfidenceOptions, ConfidenceSampler
from mdmrl_plugins.cogrpo.schedules import AmusedSchedule, AmusedScheduleOptions


@pytest.fixture
def parts(tokenizer):  # noqa: F811
    return (*tiny_modules(), tokenizer)


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


# --------------------------------------------------------------------------- null conditioning


def test_null_conditioning_is_the_empty_prompts_and_is_reused(parts):
    bb = AmusedBackbone.from_modules(*parts)
    first = bb.null_conditioning(3)
    fresh = bb.encode_prompts(["", "", ""])
    assert torch.equal(first.hidden, fresh.hidden) and torch.equal(first.pooled, fresh.pooled)
    assert torch.equal(first.attention_mask, fresh.attention_mask)
    assert bb.null_conditioning(3) is first  # reused
    assert bb.null_conditioning(2).hidden.shape[0] == 2  # another batch size: encoded again
    with torch.no_grad():  # a checkpoint load changes the frozen text encoder in place
        for p in bb.text_encoder.parameters():
            p.mul_(1.5)
    changed = bb.null_conditioning(2)
    assert torch.equal(changed.hidden, bb.encode_prompts(["", ""]).hidden)
    assert not torch.equal(changed.hidden, first.hidden[:2])


def test_null_conditioning_cached_in_inference_mode_still_trains(parts):
    """The sampler runs in inference mode; the cached tensors must still be usable by a
    later forward with gradients (the replay of a trained step)."""
    bb = AmusedBackbone.from_modules(*parts)
    with torch.inference_mode():
        bb.null_conditioning(2)
    uncond = bb.null_conditioning(2)
    assert not uncond.hidden.is_inference() and not uncond.pooled.is_inference()
    tokens = torch.full((2, bb.num_tokens), bb.mask_token_id)
    out = bb(tokens, uncond, torch.ones(2))
    out.logits.logsumexp(-1).sum().backward()
    assert any(p.grad is not None for p in bb.transformer.parameters())


# --------------------------------------------------------------------------- against the pipeline


def test_per_sample_draws_the_pipelines_distribution(parts):
    """Final tokens of 40 pipeline calls (seeds 0..39) and of 40 per_sample rollouts
    (other seeds) on the same model, schedule and guidance: one distribution (chi-square
    two-sample test over the codebook), while the tokens themselves differ."""
    steps, guidance, calls = 4, 10.0, 40
    pipe = amused_pipeline(parts)
    bb = AmusedBackbone.from_modules(*parts)
    sampler = ConfidenceSampler(ConfidenceOptions(rng="per_sample", rounding="floor"))
    schedule = AmusedSchedule(AmusedScheduleOptions(guidance_scale=guidance))
    ours = torch.zeros(CODEBOOK, dtype=torch.long)
    theirs = torch.zeros(CODEBOOK, dtype=torch.long)
    same = 0
    for k in range(calls):
        peer = pipe(
            PROMPTS,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(k),
            output_type="latent",
        ).images.reshape(len(PROMPTS), -1)
        traj = sampler.sample(bb, schedule, PROMPTS, steps, torch.tensor([1000 + 2 * k, 1001 + 2 * k]))
        theirs += torch.bincount(peer.flatten(), minlength=CODEBOOK)
        ours += torch.bincount(traj.final_tokens.flatten(), minlength=CODEBOOK)
        same += int((peer == traj.final_tokens).sum())
    keep = (ours + theirs) > 0
    assert int(keep.sum()) >= CODEBOOK // 2  # a spread distribution, not a constant image
    stat = float(((ours - theirs).double()[keep] ** 2 / (ours + theirs).double()[keep]).sum())
    assert chi2_sf(stat, int(keep.sum()) - 1) > 1e-3
    assert same < ours.sum()  # other random numbers: not the pipeline's tokens
