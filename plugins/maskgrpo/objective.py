"""The MaskGRPO objective: GRPO with an ELBO-difference importance ratio.

A masked diffusion model has no tractable likelihood of a finished sample, so MaskGRPO
(arXiv 2510.02880, Eq. 2 and 9-10) re-masks each finished completion o at a mask level
t and compares the ELBO-weighted reconstruction log-likelihood of the masked tokens
under two policies. One function per piece of the paper:

- :func:`mask_levels`        t_j = gamma + (1 - gamma) (j - 1/2) / mu, j = 1..mu (truncation)
- :func:`masked_count`       the number of re-masked positions at level t
- :func:`mask_seed`          the seed of Rev(o, t_j, S_j) (same mask for every policy)
- :func:`seeded_mask`        Rev(o, t_j, S_j): a random mask of that many positions
- :func:`sequence_elbo`      l_pi(o^t, o | c) = 1/(t N) sum_{i masked} log pi(o_i | o^t, c) (Eq. 2)
- :func:`clipped_surrogate`  -min(rho A, clip(rho, 1 - eps, 1 + eps) A)
- :func:`kl_k3`              exp(d) - d - 1, d = l_ref - l_theta (Eq. 10)

The ratio of inner update j is rho_j = exp(l_theta(o^{t_j}) - l_old(o^{t_j})) (Eq. 9).
Each term j is one optimizer step (``update_per_term``), as in the paper's mu inner
updates on one rollout batch.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from mdmrl.errors import UserError
from mdmrl.estimators import kl_k3 as shared_kl_k3
from mdmrl.interfaces import Backbone, BuildContext, Objective, Policies
from mdmrl.trajectory import Conditioning, LossOutput, Trajectory
from mdmrl_plugins.maskgrpo.emerge import CFG_SCALE, TEMPERATURE, guided_log_probs

GUIDANCE = ("rollout", "conditional")
#: Defaults that follow the backbone's modality (the paper's Sec. 3.3-3.4): (re-mask, gamma).
IMAGE_DEFAULTS, TEXT_DEFAULTS = ("random", 0.8), ("ar-fading", 0.6)

#: How many samples' old-policy values are kept (least recently used are dropped).
OLD_CACHE_SAMPLES = 65536


def mask_levels(mu: int, gamma: float) -> list[float]:
    """The truncated mask levels t_j = gamma + (1 - gamma) (j - 1/2) / mu, j = 1..mu.

    The midpoints of mu equal slices of (gamma, 1): every level lies strictly inside
    (gamma, 1) for any mu >= 1 and 0 <= gamma < 1. (The paper's t_j = gamma +
    (1 - gamma) j / mu reaches t = 1 at j = mu, a fully masked completion whose ELBO
    no longer depends on o's other tokens; its code caps that level at 0.999.)"""
    if mu < 1:
        raise ValueError(f"mu must be >= 1, got {mu}")
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    return [gamma + (1.0 - gamma) * (j - 0.5) / mu for j in range(1, mu + 1)]


def masked_count(level: float, num_tokens: int) -> int:
    """k = ceil(t N), kept in [1, N - 1] (N >= 2): at least one token is masked and at
    least one token of o stays visible. The realised mask level is k / N; it is >= t,
    so it stays above gamma whenever the grid has a count in (gamma N, N)."""
    if num_tokens < 2:
        return num_tokens
    return min(max(math.ceil(level * num_tokens), 1), num_tokens - 1)


def mask_seed(traj_seed: int, term: int, salt: int) -> int:
    """S_j: a 63-bit seed from the trajectory's seed, the term index j (1-based) and a
    salt. A stable hash (blake2b), so masks are the same across processes and runs."""
    h = hashlib.blake2b(f"maskgrpo:{int(traj_seed)}:{int(term)}:{int(salt)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def seeded_mask(seeds: torch.Tensor, term: int, level: float, num_tokens: int, salt: int = 0) -> torch.Tensor:
    """Rev(o, t_j, S_j): for each row b, ``masked_count(level, N)`` positions drawn
    uniformly without replacement by a CPU generator seeded with
    ``mask_seed(seeds[b], term, salt)``. Returns bool [B, N] on the CPU; the same
    arguments always give the same mask."""
    k = masked_count(level, num_tokens)
    rows = []
    for s in seeds.tolist():
        g = torch.Generator().manual_seed(mask_seed(s, term, salt))
        m = torch.zeros(num_tokens, dtype=torch.bool)
        m[torch.randperm(num_tokens, generator=g)[:k]] = True
        rows.append(m)
    return torch.stack(rows) if rows else torch.zeros(0, num_tokens, dtype=torch.bool)


def sequence_elbo(
    log_probs: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, level: torch.Tensor
) -> torch.Tensor:
    """l_pi(o^t, o | c) = 1/(t N) sum_{i in M} log pi(o_i | o^t, c), float32 [B] (Eq. 2).

    log_probs: float [B, N, V] of the model on the re-masked o^t; targets: long [B, N]
    the completion o; masked: bool [B, N] the set M; level: float [B] the mask level t.
    With |M| = t N exactly (t the realised level), this is the mean log-likelihood of
    the masked tokens."""
    n = targets.shape[1]
    picked = log_probs.gather(-1, targets[..., None])[..., 0]
    total = torch.where(masked, picked, torch.zeros_like(picked)).sum(1)
    return total / (level.to(total.device, torch.float32) * n)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample loss -min(rho A, clip(rho, 1 - eps, 1 + eps) A), float [B]."""
    return -torch.minimum(ratio * advantages, ratio.clamp(1.0 - eps, 1.0 + eps) * advantages)


def clip_active(ratio: torch.Tensor, advantages: torch.Tensor, eps: float) -> torch.Tensor:
    """bool [B]: where the clipped branch is taken (zero gradient)."""
    return ((advantages > 0) & (ratio > 1.0 + eps)) | ((advantages < 0) & (ratio < 1.0 - eps))


def kl_k3(elbo_theta: torch.Tensor, elbo_ref: torch.Tensor) -> torch.Tensor:
    """D_KL estimate of Eq. 10 on the ELBO difference (k3): exp(d) - d - 1 with
    d = l_ref - l_theta, float [B], always >= 0."""
    return shared_kl_k3(elbo_theta, elbo_ref)


@dataclass
class MaskGRPOOptions:
    """Options of the ``mask-grpo`` objective."""

    mu: int = field(
        default=4,
        metadata={"doc": "mu: inner updates (mask levels) per rollout batch, one term each", "min": 1},
    )
    gamma: float | None = field(
        default=None,
        metadata={
            "doc": "gamma: lower cut-off of the mask levels, which lie in (gamma, 1); unset = 0.8 for an "
            "image backbone, 0.6 for a text backbone",
            "min": 0.0,
            "max_exclusive": 1.0,
        },
    )
    remask: str | None = field(
        default=None,
        metadata={
            "doc": "re-mask function: random (exactly ceil(t N) positions) or ar-fading (Alg. 1: mask "
            "probability rising along the completion); unset = random for an image backbone, ar-fading "
            "for a text backbone",
            "choices": ["random", "ar-fading"],
        },
    )
    clip_eps: float = field(
        default=0.2,
        metadata={"doc": "clip range epsilon of the surrogate", "min_exclusive": 0.0, "max_exclusive": 1.0},
    )
    kl_beta: float = field(
        default=0.0,
        metadata={"doc": "beta: weight of the k3 KL to the frozen reference model (Eq. 10)", "min": 0.0},
    )
    guidance: str = field(
        default="rollout",
        metadata={
            "doc": "distribution the ELBO is scored under: 'rollout' = the CFG scale and temperature the "
            "sampler recorded (per-sample means over steps); 'conditional' = the plain conditional model",
            "choices": list(GUIDANCE),
        },
    )
    mask_salt: int = field(
        default=0,
        metadata={"doc": "salt mixed into the re-mask seeds (change it to draw other masks)", "min": 0},
    )


class MaskGRPOObjective(Objective):
    """MaskGRPO's clipped surrogate on the ELBO-difference ratio, one term (and one
    optimizer step) per truncated mask level, plus an optional k3 KL to a reference.

    Old policy: l_old(o^{t_j}) is computed, without gradients, the first time a sample
    is seen, for all mu levels at once, and cached (keyed by the sample's content and
    j). The engine calls the objective right after the rollout with unchanged weights,
    so the first sight is the rollout policy. :meth:`prepare` computes the cache for a
    whole rollout batch up front."""

    name = "mask-grpo"
    Options = MaskGRPOOptions
    update_per_term = True
    phases = ("model",)

    def __init__(self, options: MaskGRPOOptions | None = None, text: bool = False):
        o = options or MaskGRPOOptions()
        defaults = TEXT_DEFAULTS if text else IMAGE_DEFAULTS
        self.remask_name = o.remask if o.remask is not None else defaults[0]
        self.gamma = o.gamma if o.gamma is not None else defaults[1]
        if o.mu < 1:
            raise UserError(f"objective.options.mu: {o.mu} must be >= 1")
        if self.remask_name not in ("random", "ar-fading"):
            raise UserError(f"objective.options.remask: {o.remask!r} is not one of random, ar-fading")
        if not 0.0 <= self.gamma < 1.0:
            raise UserError(f"objective.options.gamma: {o.gamma} must be in [0, 1)")
        if not 0.0 < o.clip_eps < 1.0:
            raise UserError(f"objective.options.clip_eps: {o.clip_eps} must be in (0, 1)")
        if o.kl_beta < 0:
            raise UserError(f"objective.options.kl_beta: {o.kl_beta} must be >= 0")
        if o.guidance not in GUIDANCE:
            raise UserError(f"objective.options.guidance: {o.guidance!r} is not one of {', '.join(GUIDANCE)}")
        self.options = o
        self.levels = mask_levels(o.mu, self.gamma)
        self._old: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @classmethod
    def from_options(cls, options: MaskGRPOOptions, ctx: BuildContext) -> MaskGRPOObjective:
        from mdmrl_plugins.text.protocol import is_text_backbone

        return cls(options, text=is_text_backbone(ctx.backbone))

    def num_terms(self, traj: Trajectory) -> int:
        """mu: one term per mask level."""
        return self.options.mu

    # -- the ELBO of one level ------------------------------------------------------------
    def guidance_params(self, traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(temperature, cfg_scale) float32 [B] for ``guidance = "rollout"``: the means
        over steps of the recorded actions. None for "conditional"."""
        if self.options.guidance == "conditional":
            return None
        acts = traj.actions.float()
        return acts[:, :, TEMPERATURE].mean(1), acts[:, :, CFG_SCALE].mean(1)

    def elbo(
        self,
        backbone: Backbone,
        traj: Trajectory,
        term: int,
        cond: Conditioning,
        uncond: Conditioning,
    ) -> torch.Tensor:
        """l_pi(o^{t_j}, o | c) of every row under ``backbone``, float32 [B] (gradients
        when enabled). term: 0-based index j - 1 of the level."""
        from mdmrl_plugins.maskgrpo.text_remask import remask
        from mdmrl_plugins.text.protocol import is_text_backbone, pad_after_eos

        device = next(backbone.parameters()).device
        o = traj.final_tokens.to(device)
        if is_text_backbone(backbone):  # after the first EOS a completion is padding (LLaDA's rule)
            o = pad_after_eos(o, backbone.eos_token_ids, backbone.pad_token_id)
        b, n = o.shape
        masked, level = remask(
            self.remask_name, traj.seeds, term + 1, self.levels[term], n, self.options.mask_salt
        )
        masked = masked.to(device)
        o_t = torch.where(masked, torch.full_like(o, backbone.mask_token_id), o)
        g = self.guidance_params(traj)
        if g is None:
            ones = torch.ones(b, device=device)
            log_probs, _ = guided_log_probs(backbone, o_t, cond, None, ones, ones)
        else:
            log_probs, _ = guided_log_probs(backbone, o_t, cond, uncond, g[0], g[1])
        return sequence_elbo(log_probs, o, masked, level)

    def mask_fraction(self, term: int, num_tokens: int) -> float:
        """The fraction of the N positions level ``term`` masks: realised (random) or
        expected (ar-fading)."""
        from mdmrl_plugins.maskgrpo.text_remask import expected_masked_fraction

        if self.remask_name == "ar-fading":
            return expected_masked_fraction(num_tokens, self.levels[term])
        return masked_count(self.levels[term], num_tokens) / num_tokens

    # -- the old policy --------------------------------------------------------------------
    def _keys(self, traj: Trajectory) -> list[bytes]:
        """One content key per row: seed, prompt, finished tokens, recorded temperature
        and CFG scale, and the options that change the ELBO."""
        o = self.options
        toks = traj.final_tokens.detach().cpu().contiguous()
        acts = traj.actions.detach().float().cpu()[:, :, [TEMPERATURE, CFG_SCALE]].contiguous()
        keys = []
        for i in range(traj.batch_size):
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{int(traj.seeds[i])}|{o.mu}|{self.gamma!r}|{o.guidance}|{o.mask_salt}|".encode())
            h.update(self.remask_name.encode())
            h.update(traj.prompts[i].encode())
            h.update(toks[i].numpy().tobytes())
            h.update(acts[i].numpy().tobytes())
            keys.append(h.digest())
        return keys

    def _compute_old(self, policies: Policies, traj: Trajectory, keys: list[bytes]) -> None:
        """Compute l_old for every level of every row with the current weights (no
        gradients) and cache the rows not cached yet."""
        with torch.no_grad():
            cols = [
                self.elbo(policies.backbone, traj, j, policies.cond, policies.uncond).float().cpu()
                for j in range(self.options.mu)
            ]
        table = torch.stack(cols, 1)  # [B, mu]
        for i, k in enumerate(keys):
            if k not in self._old:
                self._old[k] = table[i].clone()
        while len(self._old) > OLD_CACHE_SAMPLES:
            self._old.popitem(last=False)

    def prepare(self, policies: Policies, traj: Trajectory) -> None:
        """Forget cached old values and compute them for ``traj`` (a whole rollout
        batch) with the current weights, before any update of that batch."""
        self._old.clear()
        self._compute_old(policies, traj, self._keys(traj))

    def old_elbo(self, policies: Policies, traj: Trajectory, term: int) -> torch.Tensor:
        """l_old(o^{t_j}, o | c) float32 [B] (CPU) for term index ``term`` (0-based),
        computed on first sight of a row with the current weights, then cached."""
        keys = self._keys(traj)
        if any(k not in self._old for k in keys):
            self._compute_old(policies, traj, keys)
        for k in keys:
            self._old.move_to_end(k)
        return torch.stack([self._old[k][term] for k in keys])

    # -- the loss ---------------------------------------------------------------------------
    def loss(
        self,
        policies: Policies,
        traj: Trajectory,
        advantages: torch.Tensor,
        terms: list[int],
        phase: str,
    ) -> LossOutput:
        """Mean over the batch and ``terms`` of -min(rho A, clip(rho) A) + beta KL.

        advantages: float32 [B] (group-normalised); terms: 0-based level indices in
        [0, mu); phase: "model" only (the ratio does not involve the schedule)."""
        if phase not in self.phases:
            raise ValueError(f"mask-grpo trains only the model phase, got {phase!r}")
        if not terms:
            raise ValueError("loss needs at least one term")
        bad = [j for j in terms if not 0 <= j < self.options.mu]
        if bad:
            raise ValueError(f"terms {bad} outside [0, {self.options.mu})")
        beta = self.options.kl_beta
        eps = self.options.clip_eps
        if beta > 0 and policies.reference is None:
            raise UserError("objective.options.kl_beta > 0 needs a reference model, but none was provided")
        ref_cond = ref_uncond = None
        if beta > 0:
            with torch.no_grad():
                ref_cond = policies.reference.encode_prompts(traj.prompts)
                ref_uncond = policies.reference.null_conditioning(traj.batch_size)
        total = None
        ratios, clipped, kls, levels, fracs, elbos = [], [], [], [], [], []
        for j in terms:
            new = self.elbo(policies.backbone, traj, j, policies.cond, policies.uncond)
            old = self.old_elbo(policies, traj, j).to(new.device)
            adv = advantages.float().to(new.device)
            ratio = torch.exp(new - old)
            term = clipped_surrogate(ratio, adv, eps).mean()
            if beta > 0:
                with torch.no_grad():
                    ref = self.elbo(policies.reference, traj, j, ref_cond, ref_uncond).to(new.device)
                kl = kl_k3(new, ref).mean()
                term = term + beta * kl
                kls.append(float(kl.detach()))
            total = term if total is None else total + term
            rd = ratio.detach()
            ratios.append(rd)
            clipped.append(float(clip_active(rd, adv, eps).float().mean()))
            levels.append(self.levels[j])
            fracs.append(self.mask_fraction(j, traj.final_tokens.shape[1]))
            elbos.append(float(new.detach().mean()))
        allr = torch.cat(ratios)
        stats = {
            "ratio_mean": float(allr.mean()),
            "ratio_min": float(allr.min()),
            "ratio_max": float(allr.max()),
            "clip_frac": sum(clipped) / len(clipped),
            "mask_level": sum(levels) / len(levels),
            "mask_frac": sum(fracs) / len(fracs),
            "elbo_mean": sum(elbos) / len(elbos),
        }
        if kls:
            stats["kl_ref"] = sum(kls) / len(kls)
        return LossOutput(loss=total / len(terms), stats=stats)
