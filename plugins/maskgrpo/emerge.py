"""The emerge sampler of MaskGRPO (arXiv 2510.02880, Alg. 4).

A confidence sampler (MaskGIT) decides *how many* tokens to reveal at each step and
reveals the most confident ones. The emerge sampler follows the reverse process of
the masked diffusion itself: every still-masked token is revealed independently with
probability

    p_t = (alpha_s - alpha_t) / (1 - alpha_t)

where alpha is the fraction of positions *unmasked*, alpha_t before the step and
alpha_s after it, and a revealed token is drawn from the guided, tempered
distribution

    pi(v) = softmax((u + s (c - u)) / tau_s)

with c and u the conditional and unconditional logits of one forward of 2B rows
(of the B conditional rows alone, with u = c, when the step is guidance-free: s = 1
for every row).
Tokens therefore "emerge" at a random count per step; a step may reveal none.

The schedule comes from the :class:`~mdmrl.interfaces.SchedulePolicy`: the action's
``remask_ratio`` r_t is the nominal masked fraction 1 - alpha_s after step t, so any
schedule plug-in (fixed or learned) drives the sampler. The nominal masked fraction
m_t = 1 - alpha_t is m_0 = 1 and m_(t+1) = clamp(r_t, 0, m_t), so p_t = (m_t - m_(t+1)) / m_t
in [0, 1]; the last step reveals every remaining token (m_T = 0). The probabilities
use the nominal schedule, not the realised count of masked tokens, as the reverse
process of the diffusion does.

The recorded model log-prob of step t is the sum, over the positions revealed at t,
of log pi(revealed token) (Eq. 8 of Co-GRPO), so Co-GRPO's objective can train on
emerge trajectories; a step that reveals nothing has log-prob 0. The reveal decision
itself depends only on the schedule, not on the backbone, and is not part of it.
:meth:`EmergeSampler.replay_step` recomputes it with the same function
(:func:`guided_log_probs` then :func:`filled_log_prob`) as the rollout.
"""

from __future__ import annotations

import torch

from mdmrl.interfaces import Backbone, BuildContext, Sampler, SchedulePolicy, StepReplay
from mdmrl.trajectory import ACTION_FIELDS, Conditioning, Trajectory, is_guidance_free

TEMPERATURE = ACTION_FIELDS.index("temperature")
REMASK_RATIO = ACTION_FIELDS.index("remask_ratio")
CFG_SCALE = ACTION_FIELDS.index("cfg_scale")


def masked_fraction(tokens: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The backbone's ``timestep``: fraction of positions still masked, float32 [B].

    tokens: long [B, N]."""
    return (tokens == mask_token_id).float().mean(1)


def guided_forward(
    backbone: Backbone, tokens: torch.Tensor, cond: Conditioning, uncond: Conditioning | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One backbone forward for classifier-free guidance.

    tokens: long [B, N]; cond, uncond: batch B. With ``uncond`` the backbone runs once
    on 2B rows (cond rows then uncond rows); without it, on the B conditional rows.
    The timestep is the masked fraction of ``tokens``. Returns (conditional logits
    float32 [B, N, V], unconditional logits float32 [B, N, V] or None, conditional
    features [B, N, D])."""
    b = tokens.shape[0]
    timestep = masked_fraction(tokens, backbone.mask_token_id).to(tokens.device)
    if uncond is None:
        out = backbone(tokens, cond, timestep)
        return out.logits.float(), None, out.features
    out = backbone(
        torch.cat([tokens, tokens]), Conditioning.cat([cond, uncond]), torch.cat([timestep, timestep])
    )
    logits = out.logits.float()
    return logits[:b], logits[b:], out.features[:b]


def guide(
    cond_logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    temperature: torch.Tensor,
    cfg_scale: torch.Tensor,
) -> torch.Tensor:
    """log softmax((u + s (c - u)) / tau), float32 [B, N, V].

    cond_logits c, uncond_logits u: float [B, N, V] (u None: log softmax(c / tau));
    temperature tau and cfg_scale s: float [B], one per row."""
    tau = temperature.to(cond_logits.device, torch.float32)[:, None, None]
    if uncond_logits is None:
        return torch.log_softmax(cond_logits / tau, -1)
    s = cfg_scale.to(cond_logits.device, torch.float32)[:, None, None]
    return torch.log_softmax((uncond_logits + s * (cond_logits - uncond_logits)) / tau, -1)


def guided_log_probs(
    backbone: Backbone,
    tokens: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    temperature: torch.Tensor,
    cfg_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`guided_forward` then :func:`guide`: the guided, tempered log-probs of
    every position, float32 [B, N, V], and the conditional features [B, N, D].

    tokens: long [B, N]; temperature, cfg_scale: float [B]; uncond None: no guidance."""
    c, u, feats = guided_forward(backbone, tokens, cond, uncond)
    return guide(c, u, temperature, cfg_scale), feats


def filled_log_prob(log_probs: torch.Tensor, next_tokens: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """log pi_model,t: the sum over the filled positions of the log-prob of the token
    placed there, float32 [B] (0 for a row that filled nothing).

    log_probs: float [B, N, V]; next_tokens: long [B, N] (the state after the step;
    the mask id appears only where ``filled`` is False); filled: bool [B, N]."""
    v = log_probs.shape[-1]
    picked = log_probs.gather(-1, next_tokens.clamp(0, v - 1)[..., None])[..., 0]
    return torch.where(filled, picked, torch.zeros_like(picked)).sum(1)


def reveal_probability(masked_before: torch.Tensor, masked_after: torch.Tensor) -> torch.Tensor:
    """p_t = (alpha_s - alpha_t) / (1 - alpha_t) = (m_t - m_s) / m_t, float32 [B].

    masked_before m_t and masked_after m_s: nominal masked fractions 1 - alpha,
    float [B], with 0 <= m_s <= m_t <= 1. A row with m_t = 0 gets p = 1 (reveal what
    is left)."""
    mt = masked_before.float()
    ms = masked_after.float()
    p = torch.where(mt > 0, (mt - ms) / mt.clamp_min(1e-12), torch.ones_like(mt))
    return p.clamp(0.0, 1.0)


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of ``probs`` float [M, V] from ``uniforms`` float [M] in
    [0, 1): the first index whose cumulative probability exceeds u times the row's
    total. Tokens of probability 0 are never drawn. Returns long [M]."""
    cdf = probs.double().cumsum(-1)
    target = uniforms.double().to(probs.device) * cdf[:, -1]
    idx = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    return idx.clamp_max(probs.shape[-1] - 1)


class EmergeSampler(Sampler):
    """MaskGRPO's emerge sampler: each masked token is revealed with probability
    (alpha_s - alpha_t) / (1 - alpha_t) per step, drawn from the CFG-guided, tempered
    distribution. The schedule's ``remask_ratio`` sets 1 - alpha_s; its temperature
    and CFG scale shape the token distribution (its ``remask_temperature`` is unused:
    there is no confidence ranking)."""

    name = "emerge"

    def __init__(self, options=None):
        self.options = options

    @classmethod
    def from_options(cls, options, ctx: BuildContext) -> EmergeSampler:
        return cls(options)

    @staticmethod
    def _act(
        schedule: SchedulePolicy,
        step: int,
        num_steps: int,
        features: torch.Tensor,
        gens: list[torch.Generator],
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Actions, raw actions float32 [B, K] and schedule log-probs float32 [B] for
        one step; features: [B, N, D] of V^(t). A stochastic schedule is asked row by
        row with the row's own generator, so a trajectory is reproducible alone or in
        any batch."""
        b = features.shape[0]
        feats = features if schedule.needs_features else None
        if not schedule.stochastic:
            acts, raw, logp = schedule.act(step, num_steps, b, feats, None, deterministic)
            return acts.float(), raw.float(), logp.float()
        rows = [
            schedule.act(
                step, num_steps, 1, None if feats is None else feats[i : i + 1], gens[i], deterministic
            )
            for i in range(b)
        ]
        acts, raw, logp = (torch.cat([r[k].float().reshape(1, -1) for r in rows]) for k in range(3))
        return acts, raw, logp.reshape(b)

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
        """Generate B = len(prompts) token grids in ``num_steps`` steps (see the module
        docstring). Randomness of trajectory b comes only from a CPU generator seeded
        with seeds[b]: per step, the schedule's draw (stochastic schedules), then N
        uniforms for the reveal decisions and N uniforms for the token draws.

        Returns a validated :class:`Trajectory` on the backbone's device (``seeds``
        and ``group_ids`` as given)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        b, n = len(prompts), backbone.num_tokens
        if seeds.shape != (b,):
            raise ValueError(f"seeds has shape {tuple(seeds.shape)}, expected ({b},)")
        mask_id = backbone.mask_token_id
        device = next(backbone.parameters()).device
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]
        cond = backbone.encode_prompts(list(prompts))
        uncond = backbone.null_conditioning(b)
        tokens = torch.full((b, n), mask_id, dtype=torch.long, device=device)
        nominal = torch.ones(b, dtype=torch.float32)  # m_t, on CPU
        states, fills, acts_l, raws, model_lp, sched_lp = [tokens.clone()], [], [], [], [], []
        for t in range(num_steps):
            # The forward does not depend on the action, so its features can drive it.
            free = schedule.guidance_free(t, num_steps)
            c_logits, u_logits, feats = guided_forward(backbone, tokens, cond, None if free else uncond)
            acts, raw, slp = self._act(schedule, t, num_steps, feats, gens, deterministic_schedule)
            if not free and is_guidance_free(acts):  # the replay runs the B-row forward: match it
                c_logits, u_logits, _ = guided_forward(backbone, tokens, cond, None)
            last = t == num_steps - 1
            ratio = acts[:, REMASK_RATIO].cpu().clamp(0.0, 1.0)
            after = torch.zeros(b) if last else torch.minimum(ratio, nominal)
            p = reveal_probability(nominal, after)
            log_probs = guide(c_logits, u_logits, acts[:, TEMPERATURE], acts[:, CFG_SCALE])
            masked = (tokens == mask_id).cpu()
            new = tokens.clone()
            fill = torch.zeros(b, n, dtype=torch.bool, device=device)
            for i in range(b):
                u_reveal = torch.rand(n, generator=gens[i])
                u_token = torch.rand(n, generator=gens[i])
                reveal = masked[i] & (torch.ones(n, dtype=torch.bool) if last else u_reveal < p[i])
                idx = reveal.nonzero().flatten()
                if idx.numel():
                    idx_d = idx.to(device)
                    new[i, idx_d] = inverse_cdf_sample(log_probs[i, idx_d].exp(), u_token[idx])
                    fill[i, idx_d] = True
            model_lp.append(filled_log_prob(log_probs, new, fill))
            tokens = new
            nominal = after
            states.append(tokens.clone())
            fills.append(fill)
            acts_l.append(acts.to(device))
            raws.append(raw.to(device))
            sched_lp.append(slp.to(device))
        traj = Trajectory(
            tokens=torch.stack(states, 1),
            filled=torch.stack(fills, 1),
            actions=torch.stack(acts_l, 1),
            raw_actions=torch.stack(raws, 1),
            model_log_probs=torch.stack(model_lp, 1),
            schedule_log_probs=torch.stack(sched_lp, 1),
            seeds=seeds.clone(),
            prompts=list(prompts),
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
        """Recompute log pi_model,t of step ``step`` exactly as the rollout did: the
        same forward on V^(t) (2B rows, or B when the recorded s is 1 everywhere) with
        the recorded temperature and CFG scale, summed over the recorded filled
        positions. Gradients flow when enabled.

        Returns model_log_prob float32 [B] and the detached conditional features of
        V^(t) [B, N, D]."""
        device = next(backbone.parameters()).device
        tokens = traj.tokens[:, step].to(device)
        acts = traj.actions[:, step].to(device)
        guidance = None if is_guidance_free(acts) else uncond
        log_probs, feats = guided_log_probs(
            backbone, tokens, cond, guidance, acts[:, TEMPERATURE], acts[:, CFG_SCALE]
        )
        lp = filled_log_prob(log_probs, traj.tokens[:, step + 1].to(device), traj.filled[:, step].to(device))
        return StepReplay(model_log_prob=lp, features=feats.detach())
