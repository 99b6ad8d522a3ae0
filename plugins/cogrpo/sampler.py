"""The confidence re-mask sampler of Co-GRPO (Eq. 2-5) and its replay (Eq. 8/19).

At every step t the schedule policy chooses A_t = (tau_s, r, tau_r, s), then:

1. one backbone forward of batch 2B on [V^(t); V^(t)] with [uncond; cond] gives
   unconditional logits u and conditional logits c [B, N, V] (and the conditional
   branch's features, the schedule policy's input). When the step is guidance-free
   (s = 1 for every row: the rollout asks ``schedule.guidance_free``, the replay
   reads the recorded actions) the forward runs on the B conditional rows alone and
   u = c, so the guided logits are c exactly and the step costs half;
2. every masked position draws a token from the guided, tempered distribution
   softmax((u + s (c - u)) / tau_s) (Eq. 2); known positions keep theirs;
3. confidence C_i = log p(sampled token) under that same distribution plus
   tau_r x Gumbel noise for newly sampled positions, +inf for known ones (Eq. 3-4);
4. the ceil(r N) (or floor, see ``rounding``) LOWEST-confidence positions stay or
   return masked (Eq. 5; Eq. 4 as printed would pick the highest), clamped so that
   every step decodes at least one token and the last step decodes all.

The trajectory records V^(0..T), the filled positions I_t^fill, the actions, and the
old model log-prob log pi_model,t = sum over I_t^fill of log p(token) under the
guided tempered distribution. :func:`step_log_prob` is the one implementation of that
log-prob, called by both :meth:`ConfidenceSampler.sample` and
:meth:`ConfidenceSampler.replay_step` on the same inputs, so an on-policy replay of
the same batch reproduces the recorded values bit for bit. (For a codebook of at most
DENSE_MAX_CODEBOOK the ``per_sample`` draw already holds step_log_prob's terms, the
entries of the same log-softmax, and the sampler sums them as step_log_prob does.)

Known positions are never re-sampled, so for larger codebooks the per-token work
(guidance, sampling, log-probs) runs on the rows of the still-masked positions only,
gathered to [M, V]; for small ones every position draws (known ones' draws are
discarded), which costs fewer operations than the gather.

Randomness (option ``rng``):

- ``per_sample``: trajectory b draws everything from its own generator
  ``torch.Generator(device).manual_seed(seeds[b])``: first one [T, 2, N] U[0, 1)
  draw, then, step by step, the schedule's noise (a stochastic schedule is called
  once per row with batch 1 and that row's generator). At step t, row 0 of the draw
  gives each masked position its token by inverse CDF (the first token whose running
  probability sum exceeds u times the total: one uniform per position, the same
  distribution as a Gumbel-max draw over [N, V]), row 1 the re-mask Gumbel noise
  (unused at the last step). A trajectory is then the same alone or in any batch, up
  to the backbone's own batch invariance.
- ``shared``: one generator seeded with seeds[0] for the whole batch, drawing as
  diffusers' ``AmusedScheduler.step`` does: ``torch.multinomial`` over the [B*N, V]
  probabilities (all positions, as aMUSEd draws them), then a [B, N] uniform for the
  re-mask Gumbel noise (not at the last step). With the ``amused`` schedule and
  ``rounding = "floor"`` this reproduces aMUSEd's pipeline token for token.

See docs/sampling.md for every choice and where it comes from.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import Backbone, Sampler, SchedulePolicy, StepReplay
from mdmrl.trajectory import ACTION_FIELDS, NUM_ACTIONS, Conditioning, Trajectory, is_guidance_free

#: Columns of an action A_t (:data:`mdmrl.trajectory.ACTION_FIELDS` order).
SAMPLING_TEMPERATURE, REMASK_RATIO, REMASK_TEMPERATURE, CFG_SCALE = (
    ACTION_FIELDS.index(f) for f in ("temperature", "remask_ratio", "remask_temperature", "cfg_scale")
)

#: Smallest sampling temperature used (a policy's exp(u) can underflow to 0).
MIN_TEMPERATURE = 1e-6
#: Floor of the probabilities whose log is a confidence, and of the uniform noise
#: inside the Gumbel transform (as Meissonic's and aMUSEd's schedulers do).
PROB_FLOOR = 1e-20
#: Floor of logits - max before exp in :func:`inverse_cdf_sample_`: exp(-87) = 1.6e-38
#: is near float32's smallest normal number; below it exp returns denormals, which x86
#: CPUs compute up to 35 times slower. A floored entry adds at most 1.7e-38 to the
#: running sum, which does not change a float32 sum that has reached the draw's lowest
#: target (2^-25 of a total of at least 1).
EXP_FLOOR = -87.0
#: Codebooks up to this size are sampled at every position (known ones are discarded):
#: there the cost of a step is the count of small operations, and gathering the masked
#: rows costs more than it saves.
DENSE_MAX_CODEBOOK = 64
#: Larger codebooks draw on every row while more than this fraction of the B N
#: positions is masked, else on the gathered masked rows: per element of [B N, V],
#: the gather reads and writes the cond and uncond rows (4 passes) before the same
#: guidance and draw, so gathering M rows costs about 13 M passes against 9 B N.
DENSE_ROW_FRACTION = 0.7
#: The lowest draw target, as a fraction of the total: half the spacing of float32
#: uniforms (2^-24), so u = 0 lands on a token of non-negligible probability.
TARGET_FLOOR = 2.0**-25
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
    # (u + s (c - u)) / tau, one new tensor: each in-place step rounds exactly as the
    # out-of-place expression does (the operations commute bit for bit), and x / 1 = x
    z = (c - u).mul_(a[:, 3, None, None]).add_(u)
    if not bool((a[:, 0] == 1.0).all()):
        z = z.div_(a[:, 0].clamp_min(MIN_TEMPERATURE)[:, None, None])
    return z


def guided_log_probs(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor, actions: torch.Tensor
) -> torch.Tensor:
    """log softmax((u + s (c - u)) / tau_s): the per-token log-probs of the distribution
    the sampler draws from (Eq. 2), float32 [B, N, V], at every position. The sampler
    itself computes them at the filled positions only (:func:`step_log_prob`); this
    full form is the reference it is tested against."""
    return guided_logits(cond_logits, uncond_logits, actions).log_softmax(dim=-1)


def filled_log_prob(log_probs: torch.Tensor, next_tokens: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """log pi_model,t = sum over I_t^fill of log p(V_i^(t+1)) (Eq. 8/19), float32 [B],
    from the full log-probs of :func:`guided_log_probs` (reference form).

    log_probs: float [B, N, V]; next_tokens: long [B, N] (V^(t+1), may hold the mask
    id outside ``filled``); filled: bool [B, N]."""
    idx = torch.where(filled, next_tokens, 0)
    picked = log_probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return torch.where(filled, picked, 0.0).sum(-1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x [B, N, V] at the flat positions ``index`` long [M] (b * N + i): a new
    contiguous [M, V] tensor (one row copy each when x is laid out row by row, as
    backbones' logits usually are). Differentiable."""
    b, n, v = x.shape
    if x.stride(2) == 1 and x.stride(1) == v and x.stride(0) == n * v:
        return x.view(b * n, v).index_select(0, index)
    return x[index // n, index % n]


def guided_rows(
    cond_logits: torch.Tensor,
    uncond_logits: torch.Tensor,
    actions: torch.Tensor,
    index: torch.Tensor | None = None,
    unit_temperature: bool | None = None,
) -> torch.Tensor:
    """The guided, tempered logits (u + s (c - u)) / tau_s at the flat positions
    ``index`` (all B N positions when None), float32 [M, V]: :func:`guided_logits` up
    to float32 rounding (u + s (c - u) is one ``torch.lerp``; the division is skipped
    when every tau_s is 1, which changes no bit).

    cond_logits, uncond_logits: float [B, N, V]; actions: float [B, K]; index: long
    [M], flat positions b * N + i, e.g. ``mask.reshape(-1).nonzero().squeeze(1)``;
    unit_temperature: whether every tau_s is exactly 1, when the caller already knows
    (None: tested here, one host sync). Differentiable."""
    b, n, v = cond_logits.shape
    a = actions.to(device=cond_logits.device, dtype=torch.float32)
    if index is None:
        z = torch.lerp(uncond_logits.float(), cond_logits.float(), a[:, 3, None, None])  # [B, N, V]
        tau = a[:, 0, None, None]
    else:
        row = index // n  # [M] batch row of each position
        c = gather_rows(cond_logits, index).float()  # [M, V], new tensors
        z = gather_rows(uncond_logits, index).float().lerp_(c, a[:, 3].index_select(0, row)[:, None])
        tau = a[:, 0].index_select(0, row)[:, None]
    if unit_temperature is None:
        unit_temperature = bool((a[:, 0] == 1.0).all())
    if not unit_temperature:
        z = z.div_(tau.clamp_min(MIN_TEMPERATURE))
    return z.reshape(-1, v)


def step_log_prob(
    cond_logits: torch.Tensor,
    uncond_logits: torch.Tensor,
    actions: torch.Tensor,
    next_tokens: torch.Tensor,
    filled: torch.Tensor,
) -> torch.Tensor:
    """log pi_model,t = sum over I_t^fill of log p(V_i^(t+1)) under
    softmax((u + s (c - u)) / tau_s) (Eq. 8/19), float32 [B].

    The one implementation used by :meth:`ConfidenceSampler.sample` and
    :meth:`ConfidenceSampler.replay_step` (same inputs, same operations, so an
    on-policy replay reproduces the recorded value bit for bit). Only the filled rows
    [F, V] are computed (every row for a codebook of at most DENSE_MAX_CODEBOOK):
    guidance (:func:`guided_rows`), a row-wise log-softmax, the filled token's entry;
    the per-position values are summed over N in position order. Gradients flow to
    the logits.

    cond_logits, uncond_logits: float [B, N, V]; actions: float [B, K]; next_tokens:
    long [B, N] (V^(t+1), may hold the mask id outside ``filled``); filled: bool [B, N]."""
    b, n, v = cond_logits.shape
    if v <= DENSE_MAX_CODEBOOK:
        log_probs = guided_rows(cond_logits, uncond_logits, actions).log_softmax(dim=-1)  # [B N, V]
        token = torch.where(filled, next_tokens, 0).reshape(-1, 1)
        return sum_filled(log_probs.gather(-1, token).view(b, n), filled)
    index = filled.reshape(-1).nonzero().squeeze(1)  # [F]
    z = guided_rows(cond_logits, uncond_logits, actions, index)  # [F, V]
    token = next_tokens.reshape(-1).index_select(0, index)[:, None]
    picked = z.log_softmax(dim=-1).gather(-1, token).squeeze(-1)  # [F]
    per_position = torch.zeros(filled.shape, dtype=picked.dtype, device=picked.device)
    return per_position.masked_scatter(filled, picked).sum(-1)


def sum_filled(per_position: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """The sum over I_t^fill of per-position log-probs float32 [B, N] (any value
    elsewhere), in position order, float32 [B]: the last step of :func:`step_log_prob`'s
    dense branch, which the sampler also applies to the log-probs its draw holds, so
    both sum the same terms the same way.

    filled: bool [B, N]."""
    return torch.where(filled, per_position, 0.0).sum(-1)


def _block_size(v: int) -> int:
    """Block width of the two-level search in :func:`inverse_cdf_sample_`: the power
    of two nearest sqrt(V) that divides V, or V itself (one level) below V = 256."""
    if v < 256:
        return v
    k = 1 << round(math.log2(v) / 2)
    return k if v % k == 0 else v


def inverse_cdf_sample_(logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits) by inverse CDF, and its log-prob;
    overwrites ``logits`` with e = exp(logits - max) (no second [M, V] buffer).

    logits: float32 [M, V], contiguous; uniforms: float32 [M] in [0, 1), one per row
    (float32 draws are at most 1 - 2^-24). With S the running sum of e (S_V the
    total), the token is the first i with S_i > x, x = max(u, 2^-25) S_V < S_V, so
    P(i) = e_i / S_V = softmax(logits)_i up to float32 rounding of S (2^-24 of the
    total), and an entry with e_i = 0 is never chosen. logits - max is floored at
    EXP_FLOOR first. For V >= 256 the search runs in two levels
    (blocks of about sqrt(V) entries: the block by the running sum of the block sums,
    then the entry inside it), which replaces the sequential running sum over V by a
    vectorised block sum. Returns tokens long [M] and log p(token) = log e_token -
    log S_V, float32 [M]."""
    m, v = logits.shape
    top = logits.amax(dim=-1, keepdim=True)  # [M, 1]
    # the floor changes no entry above it: one pass, no test of whether a row reaches it
    e = logits.sub_(top).clamp_min_(EXP_FLOOR).exp_()  # [M, V], max entry 1
    k = _block_size(v)
    cdf = e.view(m, v // k, k).sum(-1).cumsum_(dim=-1) if k < v else e.cumsum(dim=-1)  # [M, V / k]
    total = cdf[:, -1:]
    # u <= 1 - 2^-24, so u S_V rounds below S_V: the target is in [2^-25 S_V, S_V) and
    # the search ends inside the row
    target = uniforms.clamp_min(TARGET_FLOOR)[:, None] * total
    tokens = torch.searchsorted(cdf, target, right=True)  # [M, 1]: cdf[token] > target >= cdf[token - 1]
    if k < v:
        block = tokens.clamp_max_(v // k - 1)  # a no-op unless a row is NaN (then its draw is meaningless)
        before = cdf.gather(-1, (block - 1).clamp_min_(0)).masked_fill_(block == 0, 0.0)
        inner = e.view(m, v // k, k).gather(1, block[:, :, None].expand(m, 1, k)).squeeze(1).cumsum_(dim=-1)
        # the block's own running sum can end an ulp below cdf[block] - before: stay below its end
        rest = torch.minimum(target - before, torch.nextafter(inner[:, -1:], inner.new_zeros(())))
        tokens = block * k + torch.searchsorted(inner, rest, right=True)
    tokens = tokens.clamp_max_(v - 1)
    log_p = (e.gather(-1, tokens).log_() - total.log()).squeeze(-1)
    return tokens.squeeze(-1), log_p


def sample_from_log_probs(
    log_probs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from the distribution whose row-wise log-softmax is
    ``log_probs`` float32 [M, V], by inverse CDF, and its log-prob: the token's entry
    of ``log_probs``, bit for bit (so the log-prob of a step is the one
    :func:`step_log_prob` computes from the same logits).

    targets: float32 [M, 1], one uniform per row already floored at TARGET_FLOOR. With
    S the running sum of p = exp(max(log_probs, EXP_FLOOR)), the token is the first i
    with S_i > u S_V, as in :func:`inverse_cdf_sample_` (the exponent is floored for
    the same reason; a floored entry has probability below 2e-38). One level: meant
    for codebooks of at most DENSE_MAX_CODEBOOK. Returns tokens and log-probs, long
    and float32 [M, 1]."""
    cdf = log_probs.clamp_min(EXP_FLOOR).exp_().cumsum_(dim=-1)  # [M, V], a new tensor
    tokens = torch.searchsorted(cdf, targets * cdf[:, -1:], right=True).clamp_max_(log_probs.shape[-1] - 1)
    return tokens, log_probs.gather(-1, tokens)


def gumbel_from_uniform_(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)) from uniforms u in [0, 1), both logs'
    arguments floored at PROB_FLOOR, computed IN PLACE in ``u`` (returned)."""
    return u.clamp_(PROB_FLOOR).log_().neg_().clamp_(PROB_FLOOR).log_().neg_()


def keep_masked_counts(
    ratios: Sequence[float],
    num_masked: Sequence[int],
    step: int,
    num_steps: int,
    num_tokens: int,
    rounding: str,
) -> list[int]:
    """How many positions stay masked after a non-final step, one count per row.

    ratios: r per row (float32 values, clamped to [0, 1]); num_masked: the count
    masked in V^(t) per row. k = ceil(r N) (or floor), with r N rounded to float32 as
    a float32 product is, then clamped to [T - 1 - t, num_masked - 1]: at least one
    token is decoded, and enough stay masked for every later step to decode at least
    one. A NaN ratio keeps the fewest, T - 1 - t. Computed on the host: the sampler
    reads the actions there once per step anyway, and a few Python operations cost
    less than as many tensor operations."""
    lo = num_steps - 1 - step
    out = []
    for r, m in zip(ratios, num_masked):
        if r != r:  # NaN
            out.append(lo)
            continue
        x = round_float32(min(max(r, 0.0), 1.0) * num_tokens)
        k = math.ceil(x) if rounding == "ceil" else math.floor(x)
        out.append(max(min(k, int(m) - 1), lo))
    return out


def round_float32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), as a Python float."""
    return _F32.unpack(_F32.pack(x))[0]


_F32 = struct.Struct("f")


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
    backbone: Backbone,
    tokens: torch.Tensor,
    cond: Conditioning,
    pair: Conditioning | None,
    timestep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward of batch 2B for classifier-free guidance, or of batch B for a
    guidance-free step.

    tokens: long [B, N]; cond: batch B; pair: ``Conditioning.cat([uncond, cond])``
    (batch 2B, the unconditional half first, as aMUSEd's and Meissonic's pipelines
    order it), or None for a guidance-free step: one forward of the B conditional
    rows, whose logits are returned as both (then u + s (c - u) with s = 1 is c
    exactly). timestep: :func:`masked_fraction` of ``tokens`` float32 [B] when the
    caller has it (the sampler computes it from its masked counts), else computed here.
    Returns (cond logits float32 [B, N, V], uncond logits float32 [B, N, V], cond
    features [B, N, D])."""
    if timestep is None:
        timestep = masked_fraction(tokens, backbone.mask_token_id)
    if pair is None:
        out = backbone(tokens, cond, timestep)
        logits = out.logits.float()
        return logits, logits, out.features
    b = tokens.shape[0]
    out = backbone(torch.cat([tokens, tokens]), pair, torch.cat([timestep, timestep]))
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

    def _draw_shared(
        self,
        cond_logits: torch.Tensor,
        uncond_logits: torch.Tensor,
        actions: torch.Tensor,
        tokens: torch.Tensor,
        masked: torch.Tensor,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``shared``: aMUSEd's token draw (``AmusedScheduler.step``): a token at every
        position by ``torch.multinomial`` over the [B*N, V] probabilities (the caller
        then draws the re-mask uniforms from the same generator, as aMUSEd does).
        Returns (V^(t) with the masked positions filled long [B, N], confidence base
        log(max(p(token), PROB_FLOOR)) float32 [B, N])."""
        b, n = tokens.shape
        probs = guided_logits(cond_logits, uncond_logits, actions).softmax(dim=-1)  # [B, N, V]
        sampled = torch.multinomial(probs.reshape(b * n, -1), 1, generator=gen).view(b, n)
        picked = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        return torch.where(masked, sampled, tokens), torch.log(picked.clamp(PROB_FLOOR))

    def _draw_per_sample(
        self,
        cond_logits: torch.Tensor,
        uncond_logits: torch.Tensor,
        actions: torch.Tensor,
        tokens: torch.Tensor,
        masked: torch.Tensor,
        targets: torch.Tensor,
        unit_temperature: bool,
        num_masked: int,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``per_sample``: each masked position takes its token by inverse CDF with its
        target of ``targets`` float32 [B N, 1] (row 0 of the step's draw, made from each
        row's generator at the start of the trajectory, floored at TARGET_FLOOR).

        For a codebook of at most DENSE_MAX_CODEBOOK every position draws, from the
        guided log-probs that :func:`step_log_prob`'s dense branch computes
        (:func:`sample_from_log_probs`); known positions' draws are discarded by the
        caller. Larger codebooks draw by :func:`inverse_cdf_sample_`, on the rows of the
        M = ``num_masked`` masked positions gathered to [M, V], or, while M is above
        DENSE_ROW_FRACTION of the B N positions, on every row: gathering the cond and
        uncond rows then costs more than guiding and drawing the known ones too (the
        rows' values and draws are the same either way). Returns (tokens long [B, N],
        holding the draw at every masked position; confidence base log p(token) float32
        [B, N], meaningful at masked positions; and whether that base is, at every
        masked position, bit for bit the term step_log_prob sums)."""
        b, n = tokens.shape
        if cond_logits.shape[-1] <= DENSE_MAX_CODEBOOK:
            log_probs = guided_rows(cond_logits, uncond_logits, actions, None, unit_temperature)
            sampled, log_p = sample_from_log_probs(log_probs.log_softmax(dim=-1), targets)
            return sampled.view(b, n), log_p.view(b, n), True
        if num_masked > DENSE_ROW_FRACTION * b * n:
            z = guided_rows(cond_logits, uncond_logits, actions, None, unit_temperature)  # [B N, V]
            sampled, log_p = inverse_cdf_sample_(z, targets.view(-1))
            return sampled.view(b, n), log_p.view(b, n), False
        index = masked.reshape(-1).nonzero().squeeze(1)  # [M] flat masked positions
        z = guided_rows(cond_logits, uncond_logits, actions, index, unit_temperature)  # [M, V]
        sampled, log_p = inverse_cdf_sample_(z, targets.view(-1).index_select(0, index))
        candidate = tokens.masked_scatter(masked, sampled)
        base = torch.zeros(tokens.shape, dtype=log_p.dtype, device=log_p.device).masked_scatter_(
            masked, log_p
        )
        return candidate, base, False

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
        b, n = len(prompts), backbone.num_tokens
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

        # inference mode inside the loop (no autograd bookkeeping per operation); the
        # trajectory is stacked after it, so its tensors are ordinary ones
        with torch.inference_mode():
            cond = backbone.encode_prompts(prompts)
            uncond = backbone.null_conditioning(b)
            pair = Conditioning.cat([uncond, cond])
            gens = self._generators(seeds, device)

            tokens = torch.full((b, n), mask, dtype=torch.long, device=device)
            # the positions masked in V^(t) and their count: after step 0 they are the
            # re-mask selection and its size, so no step compares the tokens to the mask id
            masked = torch.ones(b, n, dtype=torch.bool, device=device)
            num_masked = [n] * b
            # per step: V^(t+1), I_t^fill, A_t, raw A_t, log pi_model,t, schedule log-prob
            record: dict[str, list[torch.Tensor]] = {
                k: [] for k in ("tokens", "filled", "act", "raw", "lp", "slp")
            }
            if not shared:  # per_sample: every step's token and re-mask uniforms, row by row
                noise = torch.empty(b, steps, 2, n, device=device)
                for i, g in enumerate(gens):
                    noise[i].uniform_(0, 1, generator=g)
                # step-major and contiguous, each in one pass: the token draw's targets
                # [T, B N, 1] and the re-mask Gumbel noise [T, B, N] (the last step's unused)
                targets = noise[:, :, 0].transpose(0, 1).contiguous().clamp_min_(TARGET_FLOOR)
                targets = targets.view(steps, b * n, 1)
                remask_gumbel = gumbel_from_uniform_(noise[:, :, 1].transpose(0, 1).contiguous())
            remask_noise = torch.empty(b, n, device=device)  # shared draws
            positions = torch.arange(n, device=device).expand(b, n).contiguous()

            for t in range(steps):
                last = t == steps - 1
                free = schedule.guidance_free(t, steps)
                # masked_fraction(tokens), the same float32 values
                timestep = torch.tensor([k / n for k in num_masked], dtype=torch.float32, device=device)
                c_logits, u_logits, feats = cfg_forward(
                    backbone, tokens, cond, None if free else pair, timestep
                )
                feats_in = feats if schedule.needs_features else None
                act, raw, slp = self._act(
                    schedule, t, steps, b, feats_in, gens, deterministic_schedule, device
                )
                rows = act.tolist()  # the step's one host sync: its flags and counts are computed here
                unit_temperature = all(r[SAMPLING_TEMPERATURE] == 1.0 for r in rows)
                if not free and all(r[CFG_SCALE] == 1.0 for r in rows):
                    # the replay reads s = 1 from the actions and runs the B-row forward:
                    # draw from that same forward so that it reproduces this step exactly
                    c_logits, u_logits, _ = cfg_forward(backbone, tokens, cond, None, timestep)

                # Eq. 2: a token for every masked position (known positions keep theirs)
                # and the re-mask Gumbel noise (unused at the last step)
                if shared:
                    sampled, log_p = self._draw_shared(c_logits, u_logits, act, tokens, masked, gens[0])
                    exact = False
                    if not last:
                        gumbel = gumbel_from_uniform_(remask_noise.uniform_(0, 1, generator=gens[0]))
                else:
                    sampled, log_p, exact = self._draw_per_sample(
                        c_logits, u_logits, act, tokens, masked, targets[t], unit_temperature, sum(num_masked)
                    )
                    gumbel = remask_gumbel[t]

                # Eq. 3-5: re-mask the lowest-confidence new tokens (none at the last step)
                if last:
                    fill = masked
                else:
                    tau_r = act[:, REMASK_TEMPERATURE].clamp_min(0.0)
                    confidence = torch.where(masked, log_p + tau_r[:, None] * gumbel, math.inf)
                    keep = keep_masked_counts(
                        [r[REMASK_RATIO] for r in rows], num_masked, t, steps, n, self.options.rounding
                    )
                    remask = lowest_confidence_mask(confidence, torch.tensor(keep, device=device), positions)
                    fill = masked ^ remask  # remask only selects masked positions (known ones are +inf)
                nxt = torch.where(fill, sampled, tokens)

                if exact:  # step_log_prob's dense branch: the same terms, summed the same way
                    lp = sum_filled(log_p, fill)
                else:
                    lp = step_log_prob(c_logits, u_logits, act, nxt, fill)
                for key, value in zip(record, (nxt, fill, act, raw, lp, slp)):
                    record[key].append(value)
                tokens = nxt
                if not last:
                    masked, num_masked = remask, keep

        with torch.no_grad():
            start = torch.full((b, n), mask, dtype=torch.long, device=device)
            traj = Trajectory(
                tokens=torch.stack([start, *record["tokens"]], dim=1),
                filled=torch.stack(record["filled"], dim=1),
                actions=torch.stack(record["act"], dim=1),
                raw_actions=torch.stack(record["raw"], dim=1),
                model_log_probs=torch.stack(record["lp"], dim=1),
                schedule_log_probs=torch.stack(record["slp"], dim=1),
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
        pair = None if is_guidance_free(act) else Conditioning.cat([uncond, cond])
        c_logits, u_logits, feats = cfg_forward(backbone, tokens, cond, pair)
        lp = step_log_prob(c_logits, u_logits, act, nxt, fill)
        return StepReplay(model_log_prob=lp, features=feats.detach())
