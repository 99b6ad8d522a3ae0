"""The ``block`` sampler: LLaDA's semi-autoregressive generation, recording a Trajectory.

The N = gen_length completion positions are split into N / block_length blocks,
generated left to right; T = ``sampler.steps`` steps are shared equally, k = T /
(number of blocks) per block, and a block is finished (no mask left) after its k
steps. Step t works on block b = t // k, in-block step i = t % k, with the schedule
action A_t = (tau_s, r, tau_r, s):

1. one backbone forward on the whole completion V^(t) with the prompt; with guidance
   (s != 1 for some row) a second batch of rows with the null condition, and the
   guided logits u + s (c - u) (LLaDA's cfg_scale w is s = 1 + w); the mask token's
   logit is -inf (never emitted);
2. every position of block b draws a token from softmax(guided / tau_s) (tau_s = 0
   is floored at 1e-6: the most likely token), by inverse CDF from one uniform per
   position;
3. confidence of a still-masked position of the block: ``low_confidence``: log p of
   its drawn token under softmax(guided) (no temperature, as LLaDA ranks), plus
   tau_r x Gumbel noise; ``random``: the Gumbel noise alone (a uniformly random
   order);
4. the lowest-confidence positions stay masked: K = round(r N) - (positions of the
   later blocks), clamped so that this step and each remaining step of the block
   reveal at least one token; the last step of a block reveals all of it.

The recorded model log-prob of step t is the sum over the positions revealed at t of
log p(token) under softmax(guided / tau_s), the distribution that drew it (Co-GRPO's
Eq. 8), computed over the whole block by one function (:func:`block_log_probs`) in
both :meth:`BlockSampler.sample` and :meth:`BlockSampler.replay_step`, so that an
on-policy replay reproduces it bit for bit. With ``eos_padding`` (the default) the
positions after a completion's first end-of-sequence token are padding (LLaDA's
rule): they are left out of every step's sum, in the rollout and in the replay.

Randomness: trajectory b draws only from a CPU generator seeded with seeds[b]: per
step, the schedule's draw (a stochastic schedule is asked row by row), then
block_length uniforms for the tokens and block_length for the Gumbel noise, so a
trajectory is the same alone or in any batch (up to the backbone's own batch
invariance: prompts of other lengths change the padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import Backbone, BuildContext, Sampler, SchedulePolicy, StepReplay
from mdmrl.trajectory import ACTION_FIELDS, Conditioning, Trajectory, is_guidance_free
from mdmrl_plugins.cogrpo.sampler import (
    MIN_TEMPERATURE,
    gumbel_from_uniform_,
    lowest_confidence_mask,
    sum_filled,
)
from mdmrl_plugins.maskgrpo.emerge import EmergeSampler, guided_forward, inverse_cdf_sample
from mdmrl_plugins.text.protocol import completion_mask

TEMPERATURE, REMASK_RATIO, REMASK_TEMPERATURE, CFG_SCALE = (
    ACTION_FIELDS.index(f) for f in ("temperature", "remask_ratio", "remask_temperature", "cfg_scale")
)
REMASKING = ("low_confidence", "random")


@dataclass
class BlockOptions:
    """Options of the ``block`` sampler."""

    gen_length: int | None = field(
        default=None,
        metadata={
            "doc": "completion length N; unset = the backbone's (its grid is 1 x N); a learned schedule "
            "needs the backbone's",
            "min": 1,
        },
    )
    block_length: int = field(
        default=32,
        metadata={"doc": "tokens per block, generated left to right; divides gen_length", "min": 1},
    )
    remasking: str = field(
        default="low_confidence",
        metadata={
            "doc": "which masked positions of the block are revealed: low_confidence (the most likely "
            "drawn tokens first) or random",
            "choices": list(REMASKING),
        },
    )
    eos_padding: bool = field(
        default=True,
        metadata={
            "doc": "positions after a completion's first end-of-sequence token are padding: left out of "
            "the step log-probs (needs a text backbone)"
        },
    )

    def check_options(self) -> list[str]:
        if self.gen_length is not None and self.gen_length % self.block_length:
            return [f"block_length: {self.block_length} does not divide gen_length {self.gen_length}"]
        return []


# --------------------------------------------------------------------------- the math


def block_log_probs(
    cond_logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    actions: torch.Tensor,
    start: int,
    stop: int,
    mask_token_id: int,
    ranking: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling distribution of the block [start, stop): log softmax(guided /
    tau_s) float32 [B, L_b, V] with guided = u + s (c - u) (c alone when
    ``uncond_logits`` is None) and the mask token at -inf; with ``ranking``, also log
    softmax(guided) (no temperature; the same tensor when every tau_s is 1).

    cond_logits, uncond_logits: float [B, N, V]; actions: float [B, K]."""
    a = actions.to(device=cond_logits.device, dtype=torch.float32)
    if uncond_logits is None:
        guided = cond_logits[:, start:stop].to(torch.float32, copy=True)  # written below
    else:
        c, u = cond_logits[:, start:stop].float(), uncond_logits[:, start:stop].float()
        guided = u + a[:, CFG_SCALE, None, None] * (c - u)
    if 0 <= mask_token_id < guided.shape[-1]:
        guided[..., mask_token_id] = -math.inf
    tau = a[:, TEMPERATURE]
    if bool((tau == 1.0).all()):
        sampling = guided.log_softmax(-1)
        return sampling, (sampling if ranking else None)
    sampling = (guided / tau.clamp_min(MIN_TEMPERATURE)[:, None, None]).log_softmax(-1)
    return sampling, (guided.log_softmax(-1) if ranking else None)


def keep_in_block(
    ratios: list[float],
    masked: list[int],
    later: int,
    num_tokens: int,
    step_in_block: int,
    steps_per_block: int,
) -> list[int]:
    """How many positions of the active block stay masked after this step, per row.

    ratios: r per row (fraction of the N positions masked after the step); masked:
    masked positions of the block per row; later: positions of the later blocks (all
    masked). K = round(r N) - later, clamped to [k - 1 - i, masked - 1] so that this
    step and each of the block's remaining steps reveal at least one token; 0 at the
    block's last step. A NaN ratio keeps the fewest."""
    if step_in_block == steps_per_block - 1:
        return [0] * len(ratios)
    lo = steps_per_block - 1 - step_in_block
    out = []
    for r, m in zip(ratios, masked):
        target = lo if r != r else math.floor(min(max(r, 0.0), 1.0) * num_tokens + 0.5) - later
        out.append(max(min(target, m - 1), lo))
    return out


# --------------------------------------------------------------------------- the sampler


class BlockSampler(Sampler):
    """LLaDA's semi-autoregressive block sampler (see the module docstring)."""

    name = "block"
    Options = BlockOptions

    def __init__(self, options: BlockOptions | None = None):
        o = options or BlockOptions()
        if o.remasking not in REMASKING:
            raise UserError(
                f"sampler.options.remasking: {o.remasking!r}; choose one of {', '.join(REMASKING)}"
            )
        problems = o.check_options()
        if problems:
            raise UserError(f"sampler.options.{problems[0]}")
        self.options = o

    @classmethod
    def from_options(cls, options: BlockOptions, ctx: BuildContext) -> BlockSampler:
        sampler = cls(options)
        if ctx.backbone is not None:
            sampler.geometry(sampler.length(ctx.backbone), None)
        return sampler

    # ------------------------------------------------------------------ geometry

    def length(self, backbone: Backbone) -> int:
        """The completion length N: the option, else the backbone's grid."""
        return int(self.options.gen_length or backbone.num_tokens)

    def geometry(self, n: int, num_steps: int | None) -> tuple[int, int]:
        """(blocks, steps per block) for N = n and T = num_steps (blocks only when T is
        None); UserError when they do not divide."""
        lb = self.options.block_length
        if n % lb:
            raise UserError(
                f"sampler.options.block_length: {lb} does not divide the completion length {n} "
                "(sampler.options.gen_length, or the backbone's gen_length)"
            )
        blocks = n // lb
        if num_steps is None:
            return blocks, 0
        if num_steps % blocks or not 1 <= num_steps // blocks <= lb:
            raise UserError(
                f"sampler.steps: {num_steps} must be a multiple of the {blocks} blocks with at most "
                f"{lb} steps per block (block_length), e.g. {blocks * min(lb, max(1, num_steps // blocks))}"
            )
        return blocks, num_steps // blocks

    def valid_positions(self, backbone: Backbone, final_tokens: torch.Tensor) -> torch.Tensor:
        """bool [B, N]: the positions a step log-prob sums over (all, or up to the first
        end-of-sequence token with ``eos_padding``)."""
        ids = getattr(backbone, "eos_token_ids", None) if self.options.eos_padding else None
        if not ids:
            return torch.ones_like(final_tokens, dtype=torch.bool)
        return completion_mask(final_tokens, ids)

    # ------------------------------------------------------------------ interface

    @torch.no_grad()
    def sample(
        self,
        backbone: Backbone,
        schedule: SchedulePolicy,
        prompts: list[str],
        num_steps: int,
        seeds: torch.Tensor,
        group_ids: torch.Tensor | None = None,
        deterministic_schedule: bool = False,
    ) -> Trajectory:
        """Generate B = len(prompts) completions in T = ``num_steps`` steps. Returns a
        validated :class:`Trajectory` on the backbone's device."""
        prompts = list(prompts)
        b, n, steps = len(prompts), self.length(backbone), int(num_steps)
        if steps < 1:
            raise UserError(f"sampler.steps: {steps} must be at least 1")
        _, k = self.geometry(n, steps)
        lb = self.options.block_length
        seeds = torch.as_tensor(seeds, dtype=torch.long).reshape(-1)
        if seeds.numel() != b:
            raise ValueError(f"got {seeds.numel()} seeds for {b} prompts")
        mask_id = int(backbone.mask_token_id)
        device = next(backbone.parameters()).device
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]
        cond = backbone.encode_prompts(prompts)
        uncond = backbone.null_conditioning(b)
        tokens = torch.full((b, n), mask_id, dtype=torch.long, device=device)
        states, fills, acts_l, raws, sched_lp, per_pos = [tokens], [], [], [], [], []
        for t in range(steps):
            block, i = divmod(t, k)
            s0, s1 = block * lb, (block + 1) * lb
            free = schedule.guidance_free(t, steps)
            c_logits, u_logits, feats = guided_forward(backbone, tokens, cond, None if free else uncond)
            acts, raw, slp = EmergeSampler._act(schedule, t, steps, feats, gens, deterministic_schedule)
            acts = acts.to(device)
            if not free and is_guidance_free(acts):  # the replay runs the B-row forward: match it
                c_logits, u_logits, _ = guided_forward(backbone, tokens, cond, None)
            ranking = self.options.remasking == "low_confidence"
            lp, lp_rank = block_log_probs(c_logits, u_logits, acts, s0, s1, mask_id, ranking)
            noise = torch.stack([torch.rand(2, lb, generator=g) for g in gens]).to(device)  # [B, 2, L_b]
            drawn = inverse_cdf_sample(lp.exp().reshape(b * lb, -1), noise[:, 0].reshape(-1)).view(b, lb)
            masked = tokens[:, s0:s1] == mask_id
            noise_r = gumbel_from_uniform_(noise[:, 1].clone())
            if ranking:
                tau_r = acts[:, REMASK_TEMPERATURE].clamp_min(0.0)[:, None]
                confidence = lp_rank.gather(-1, drawn[..., None])[..., 0] + tau_r * noise_r
            else:
                confidence = noise_r
            confidence = torch.where(masked, confidence, math.inf)
            keep = keep_in_block(acts[:, REMASK_RATIO].tolist(), masked.sum(1).tolist(), n - s1, n, i, k)
            stay = lowest_confidence_mask(confidence, torch.tensor(keep, device=device))
            fill = torch.zeros(b, n, dtype=torch.bool, device=device)
            fill[:, s0:s1] = masked & ~stay
            tokens = tokens.clone()
            tokens[:, s0:s1] = torch.where(fill[:, s0:s1], drawn, tokens[:, s0:s1])
            lp_pos = torch.zeros(b, n, dtype=torch.float32, device=device)
            lp_pos[:, s0:s1] = lp.gather(-1, drawn[..., None])[..., 0]
            for record, value in zip(
                (states, fills, acts_l, raws, sched_lp, per_pos), (tokens, fill, acts, raw, slp, lp_pos)
            ):
                record.append(value.to(device))
        valid = self.valid_positions(backbone, tokens)
        model_lp = [sum_filled(p, f & valid) for p, f in zip(per_pos, fills)]
        traj = Trajectory(
            tokens=torch.stack(states, 1),
            filled=torch.stack(fills, 1),
            actions=torch.stack(acts_l, 1).float(),
            raw_actions=torch.stack(raws, 1).float(),
            model_log_probs=torch.stack(model_lp, 1),
            schedule_log_probs=torch.stack(sched_lp, 1).float(),
            seeds=seeds.clone(),
            prompts=prompts,
            group_ids=group_ids.clone() if group_ids is not None else torch.arange(b),
        )
        traj.validate(mask_id)
        return traj

    def replay_step(
        self,
        backbone: Backbone,
        traj: Trajectory,
        step: int,
        cond: Conditioning,
        uncond: Conditioning,
    ) -> StepReplay:
        """log pi_model,t of step ``step`` under the current backbone, with the recorded
        action (gradients flow when enabled), by the rollout's functions; and the
        detached features of V^(t)."""
        if not 0 <= step < traj.num_steps:
            raise ValueError(f"step {step} outside 0..{traj.num_steps - 1}")
        n, lb = traj.tokens.shape[-1], self.options.block_length
        _, k = self.geometry(n, traj.num_steps)
        s0, s1 = (step // k) * lb, (step // k + 1) * lb
        device = next(backbone.parameters()).device
        tokens = traj.tokens[:, step].to(device)
        acts = traj.actions[:, step].to(device)
        guidance = None if is_guidance_free(acts) else uncond
        c_logits, u_logits, feats = guided_forward(backbone, tokens, cond, guidance)
        lp, _ = block_log_probs(c_logits, u_logits, acts, s0, s1, int(backbone.mask_token_id))
        fill = traj.filled[:, step].to(device)
        after = traj.tokens[:, step + 1, s0:s1].to(device)
        index = torch.where(fill[:, s0:s1], after, 0)
        lp_pos = torch.zeros(fill.shape, dtype=torch.float32, device=device)
        lp_pos[:, s0:s1] = lp.gather(-1, index[..., None])[..., 0]
        valid = self.valid_positions(backbone, traj.final_tokens.to(device))
        return StepReplay(model_log_prob=sum_filled(lp_pos, fill & valid), features=feats.detach())
