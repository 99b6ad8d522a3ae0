"""The confidence re-mask sampler of Co-GRPO (Eq. 2-5) and its replay (Eq. 8/19).

At every step t the schedule policy chooses A_t = (tau_s, r, tau_r, s), then:

1. one backbone forward of batch 2B on [V^(t); V^(t)] with [uncond; cond] gives
   unconditional logits u and conditional logits c [B, N, V] (and the conditional
   branch's features, the schedule policy's input);
2. every masked position draws a token from the guided, tempered distribution
   softmax((u + s (c - u)) / tau_s) (Eq. 2); known positions keep theirs;
3. confidence C_i = log p(sampled token) under that same distribution plus
   tau_r x Gumbel noise for newly sampled positions, +inf for known ones (Eq. 3-4);
4. the ceil(r N) (or floor, see ``rounding``) LOWEST-confidence positions stay or
   return masked (Eq. 5; Eq. 4 as printed would pick the highest), clamped so that
   every step decodes at least one token and the last step decodes all.

The trajectory records V^(0..T), the filled positions I_t^fill, the actions, and the
old model log-prob log pi_model,t = sum over I_t^fill of log p(token) under the
guided tempered distribution. :func:`guided_log_probs` and :func:`filled_log_prob` are
the one implementation of that log-prob, used by both :meth:`ConfidenceSampler.sample`
and :meth:`ConfidenceSampler.replay_step`, so an on-policy replay of the same batch
reproduces the recorded values bit for bit.

Randomness (option ``rng``):

- ``per_sample``: trajectory b draws everything from its own generator
  ``torch.Generator(device).manual_seed(seeds[b])``, per step in this order: the
  schedule's noise (a stochastic schedule is called once per row with batch 1 and
  that row's generator), the token noise (Gumbel-max over [N, V]), the re-mask noise
  ([N], not drawn at the last step). A trajectory is then the same alone or in any
  batch, up to the backbone's own batch invariance.
- ``shared``: one generator seeded with seeds[0] for the whole batch, drawing as
  diffusers' ``AmusedScheduler.step`` does: ``torch.multinomial`` over the [B*N, V]
  probabilities, then a [B, N] uniform for the re-mask Gumbel noise (not at the last
  step). With the ``amused`` schedule and ``rounding = "floor"`` this reproduces
  aMUSEd's pipeline token for token.

See docs/sampling.md for every choice and where it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import Backbone, Sampler, SchedulePolicy, StepReplay
from mdmrl.trajectory import NUM_ACTIONS, Conditioning, Trajectory

#: Smallest sampling temperature used (a policy's exp(u) can underflow to 0).
MIN_TEMPERATURE = 1e-6
#: Floor of the probabilities whose log is a confidence, and of the uniform noise
#: inside the Gumbel transform (as Meissonic's and aMUSEd's schedulers do).
PROB_FLOOR = 1e-20
RNG_MODES = ("per_sample", "shared")
ROUNDINGS = ("ceil", "floor")


@dataclass
class ConfidenceOptions:
    """Options of the ``confidence`` sampler."""

    rng: str = field(
        default="per_sample",
        metadata={
            "doc": "per_sample: trajectory b draws all noise from a generator seeded with seeds[b] "
            "(reproducible alone); shared: one generator seeded with seeds[0] for the batch, drawing "
            "in aMUSEd's order (AmusedScheduler.step)",
            "choices": list(RNG_MODES),
        },
    )
    rounding: str = field(
        default="ceil",
        metadata={
            "doc": "positions left masked after a step: ceil(r N) as in Co-GRPO Eq. 5, or floor(r N) as "
            "Meissonic's and aMUSEd's schedulers compute it",
            "choices": list(ROUNDINGS),
        },
    )


# --------------------------------------------------------------------------- the math


def masked_fraction(tokens: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Fraction of positions still masked: tokens long [B, N] -> float32 [B] in [0, 1]."""
    return (tokens == mask_token_id).sum(-1).to(torch.float32) / tokens.shape[-1]


def guided_logits(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor, actions: torch.Tensor
) -> torch.Tensor:
    """Guided, tempered logits (u + s (c - u)) / tau_s, float32 [B, N, V].

    cond_logits c, uncond_logits u: float [B, N, V]; actions: float [B, K] (tau_s is
    column 0, s column 3; tau_s is floored at MIN_TEMPERATURE)."""
    c = cond_logits.float()
    u = uncond_logits.float()
    a = actions.to(device=c.device, dtype=torch.float32)
    s = a[:, 3, None, None]
    tau = a[:, 0].clamp_min(MIN_TEMPERATURE)[:, None, None]
    return (u + s * (c - u)) / tau


def guided_log_probs(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor, actions: torch.Tensor
) -> torch.Tensor:
    """log softmax((u + s (c - u)) / tau_s): the per-token log-probs of the distribution
    the sampler draws from (Eq. 2), float32 [B, N, V]. The single implementation used
    by the rollout and by the replay."""
    return guided_logits(cond_logits, uncond_logits, actions).log_softmax(dim=-1)


def filled_log_prob(log_probs: torch.Tensor, next_tokens: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """log pi_model,t = sum over I_t^fill of log p(V_i^(t+1)) (Eq. 8/19), float32 [B].

    log_probs: float [B, N, V]; next_tokens: long [B, N] (V^(t+1), may hold the mask
    id outside ``filled``); filled: bool [B, N]."""
    idx = torch.where(filled, next_tokens, 0)
    picked = log_probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return torch.where(filled, picked, 0.0).sum(-1)


def gumbel_from_uniform_(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)) from uniforms u in [0, 1), both logs'
    arguments floored at PROB_FLOOR, computed IN PLACE in ``u`` (returned)."""
    return u.clamp_(PROB_FLOOR).log_().neg_().clamp_(PROB_FLOOR).log_().neg_()


def keep_masked_counts(
    ratio: torch.Tensor, num_masked: torch.Tensor, step: int, num_steps: int, num_tokens: int, rounding: str
) -> torch.Tensor:
    """How many positions stay masked after a non-final step, long [B].

    ratio: r float [B] (clamped to [0, 1]); num_masked: long [B] masked in V^(t).
    k = ceil(r N) (or floor), computed in float32, then clamped to
    [T - 1 - t, num_masked - 1]: at least one token is decoded, and enough stay masked
    for every later step to decode at least one."""
    x = ratio.to(torch.float32).clamp(0.0, 1.0) * num_tokens
    k = (torch.ceil(x) if rounding == "ceil" else torch.floor(x)).to(torch.long)
    k = torch.minimum(k, num_masked.to(torch.long) - 1)
    return k.clamp_min(num_steps - 1 - step)


def lowest_confidence_mask(
    confidence: torch.Tensor, counts: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """bool [B, N]: True at the counts[b] lowest-confidence positions of each row.

    confidence: float [B, N] (+inf never selected unless counts exceed the finite
    ones); counts: long [B]; positions: optional precomputed long [B, N] holding
    0..N-1 in every row. Ties are broken by position (stable sort), so exactly
    counts[b] positions are selected."""
    b, n = confidence.shape
    if positions is None:
        positions = torch.arange(n, device=confidence.device).expand(b, n).contiguous()
    order = confidence.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    return ranks < counts.to(confidence.device)[:, None]


def cfg_forward(
    backbone: Backbone, tokens: torch.Tensor, pair: Conditioning
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward of batch 2B for classifier-free guidance.

    tokens: long [B, N]; pair: ``Conditioning.cat([uncond, cond])`` (batch 2B, the
    unconditional half first, as aMUSEd's and Meissonic's pipelines order it).
    Returns (cond logits float32 [B, N, V], uncond logits float32 [B, N, V], cond
    features [B, N, D])."""
    b = tokens.shape[0]
    doubled = torch.cat([tokens, tokens])
    out = backbone(doubled, pair, masked_fraction(doubled, backbone.mask_token_id))
    logits = out.logits.float()
    return logits[b:], logits[:b], out.features[b:]


def backbone_device(backbone: Backbone) -> torch.device:
    """The device the backbone computes on."""
    dev = getattr(backbone, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for t in backbone.parameters():
        return t.device
    for t in backbone.buffers():
        return t.device
    return torch.device("cpu")


def default_group_ids(prompts: list[str]) -> torch.Tensor:
    """One id per distinct prompt, in order of first appearance, long [B]."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(p, len(ids)) for p in prompts], dtype=torch.long)


# --------------------------------------------------------------------------- the sampler


class ConfidenceSampler(Sampler):
    """Co-GRPO's confidence re-mask sampler (Eq. 2-5); see the module docstring."""

    name = "confidence"
    Options = ConfidenceOptions

    def __init__(self, options: ConfidenceOptions | None = None):
        o = options or ConfidenceOptions()
        if o.rng not in RNG_MODES:
            raise UserError(f"sampler.options.rng: {o.rng!r}; choose one of {', '.join(RNG_MODES)}")
        if o.rounding not in ROUNDINGS:
            raise UserError(f"sampler.options.rounding: {o.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        self.options = o

    # ------------------------------------------------------------------ helpers

    def _generators(self, seeds: torch.Tensor, device: torch.device) -> list[torch.Generator]:
        if self.options.rng == "shared":
            return [torch.Generator(device=device).manual_seed(int(seeds[0]))]
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds.tolist()]

    def _act(
        self,
        schedule: SchedulePolicy,
        step: int,
        num_steps: int,
        batch: int,
        features: torch.Tensor | None,
        gens: list[torch.Generator],
        deterministic: bool,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The schedule's (actions, raw, log_prob) for every row, float32 on ``device``."""
        if self.options.rng == "per_sample" and schedule.stochastic and not deterministic:
            rows = [
                schedule.act(
                    step, num_steps, 1, None if features is None else features[i : i + 1], gens[i], False
                )
                for i in range(batch)
            ]
            outs = [torch.cat([r[j].reshape(1, -1).to(device) for r in rows]) for j in range(3)]
            actions, raw, logp = outs[0], outs[1], outs[2].reshape(batch)
        else:
            gen = gens[0] if self.options.rng == "shared" else None
            actions, raw, logp = schedule.act(step, num_steps, batch, features, gen, deterministic)
        actions = actions.to(device=device, dtype=torch.float32)
        raw = raw.to(device=device, dtype=torch.float32)
        logp = logp.to(device=device, dtype=torch.float32).reshape(batch)
        if tuple(actions.shape) != (batch, NUM_ACTIONS) or tuple(raw.shape) != (batch, NUM_ACTIONS):
            raise ValueError(
                f"schedule {schedule.name!r} returned actions {tuple(actions.shape)} / raw "
                f"{tuple(raw.shape)}, expected ({batch}, {NUM_ACTIONS})"
            )
        return actions, raw, logp

    def _gumbel(self, buf: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """Standard Gumbel noise of buf's shape [B, ...] (:func:`gumbel_from_uniform_`
        of U[0, 1) draws written into ``buf``): row b from gens[b] (per_sample), or the
        whole tensor from the shared generator in one draw (shared, as aMUSEd draws)."""
        if self.options.rng == "shared":
            buf.uniform_(0, 1, generator=gens[0])
        else:
            for i, g in enumerate(gens):
                buf[i].uniform_(0, 1, generator=g)
        return gumbel_from_uniform_(buf)

    # ------------------------------------------------------------------ interface

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
        """Generate B = len(prompts) token grids in T = ``num_steps`` steps.

        seeds: long [B]. Returns a validated :class:`Trajectory` whose tensors live on
        the backbone's device (seeds and group_ids stay where they were given)."""
        prompts = list(prompts)
        b, n, v = len(prompts), backbone.num_tokens, backbone.codebook_size
        steps = int(num_steps)
        mask = int(backbone.mask_token_id)
        if steps < 1:
            raise UserError(f"sampler.steps: {steps} must be at least 1")
        if steps > n:
            raise UserError(
                f"sampler.steps: {steps} steps cannot each decode a token of a {n}-token grid; use at most {n}"
            )
        seeds = torch.as_tensor(seeds, dtype=torch.long).reshape(-1)
        if seeds.numel() != b:
            raise ValueError(f"got {seeds.numel()} seeds for {b} prompts")
        group_ids = default_group_ids(prompts) if group_ids is None else torch.as_tensor(group_ids).long()
        device = backbone_device(backbone)
        shared = self.options.rng == "shared"

        with torch.no_grad():
            cond = backbone.encode_prompts(prompts)
            uncond = backbone.null_conditioning(b)
            pair = Conditioning.cat([uncond, cond])
            gens = self._generators(seeds, device)

            tokens = torch.full((b, n), mask, dtype=torch.long, device=device)
            all_tokens = torch.empty(b, steps + 1, n, dtype=torch.long, device=device)
            all_tokens[:, 0] = tokens
            filled = torch.zeros(b, steps, n, dtype=torch.bool, device=device)
            actions = torch.zeros(b, steps, NUM_ACTIONS, device=device)
            raw_actions = torch.zeros(b, steps, NUM_ACTIONS, device=device)
            model_lp = torch.zeros(b, steps, device=device)
            sched_lp = torch.zeros(b, steps, device=device)
            token_noise = None if shared else torch.empty(b, n, v, device=device)
            remask_noise = torch.empty(b, n, device=device)
            positions = torch.arange(n, device=device).expand(b, n).contiguous()

            for t in range(steps):
                masked = tokens == mask
                c_logits, u_logits, feats = cfg_forward(backbone, tokens, pair)
                feats_in = feats if schedule.needs_features else None
                act, raw, slp = self._act(
                    schedule, t, steps, b, feats_in, gens, deterministic_schedule, device
                )
                logp = guided_log_probs(c_logits, u_logits, act)  # [B, N, V]

                # Eq. 2: a token for every position (kept only where masked)
                if shared:
                    probs = guided_logits(c_logits, u_logits, act).softmax(dim=-1)
                    sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gens[0])
                    sampled = sampled.view(b, n)
                    picked = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
                    confidence = torch.log(picked.clamp(PROB_FLOOR))
                else:  # Gumbel-max: argmax(log p + G)
                    sampled = self._gumbel(token_noise, gens).add_(logp).argmax(dim=-1)
                    confidence = logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
                candidate = torch.where(masked, sampled, tokens)

                # Eq. 3-5: re-mask the lowest-confidence new tokens (none at the last step)
                if t < steps - 1:
                    gumbel = self._gumbel(remask_noise, gens)
                    tau_r = act[:, 2].clamp_min(0.0)
                    confidence = (confidence + tau_r[:, None] * gumbel).masked_fill_(~masked, float("inf"))
                    keep = keep_masked_counts(act[:, 1], masked.sum(-1), t, steps, n, self.options.rounding)
                    remask = lowest_confidence_mask(confidence, keep, positions)
                    nxt = candidate.masked_fill(remask, mask)
                    fill = masked ^ remask  # remask only selects masked positions (known ones are +inf)
                else:
                    nxt = candidate
                    fill = masked

                model_lp[:, t] = filled_log_prob(logp, nxt, fill)
                sched_lp[:, t] = slp
                actions[:, t] = act
                raw_actions[:, t] = raw
                filled[:, t] = fill
                all_tokens[:, t + 1] = nxt
                tokens = nxt

        traj = Trajectory(
            tokens=all_tokens,
            filled=filled,
            actions=actions,
            raw_actions=raw_actions,
            model_log_probs=model_lp,
            schedule_log_probs=sched_lp,
            seeds=seeds.clone(),
            prompts=prompts,
            group_ids=group_ids,
        )
        traj.validate(mask)
        return traj

    def replay_step(
        self,
        backbone: Backbone,
        traj: Trajectory,
        step: int,
        cond: Conditioning,
        uncond: Conditioning,
    ) -> StepReplay:
        """log pi_model,t of the recorded filled tokens under the current backbone and
        the recorded action (gradients flow when enabled), and the detached
        conditional-branch features of V^(t). cond/uncond: batch B."""
        if not 0 <= step < traj.num_steps:
            raise ValueError(f"step {step} outside 0..{traj.num_steps - 1}")
        device = backbone_device(backbone)
        tokens = traj.tokens[:, step].to(device)
        nxt = traj.tokens[:, step + 1].to(device)
        fill = traj.filled[:, step].to(device)
        act = traj.actions[:, step].to(device=device, dtype=torch.float32)
        c_logits, u_logits, feats = cfg_forward(backbone, tokens, Conditioning.cat([uncond, cond]))
        logp = guided_log_probs(c_logits, u_logits, act)
        return StepReplay(model_log_prob=filled_log_prob(logp, nxt, fill), features=feats.detach())
