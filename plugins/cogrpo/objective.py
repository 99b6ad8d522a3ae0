"""The Co-GRPO objective: a clipped GRPO surrogate on the factorised joint ratio.

One function per equation of the paper (Co-GRPO, arXiv 2512.22288):

- :func:`ratio_model`       log of Eq. 18/19: log pi_model,t - log pi_old model,t
- :func:`ratio_schedule`    log of Eq. 20:    log pi_schedule,t - log pi_old schedule,t
- :func:`ratio_phase`       log of Eq. 17 (joint) and Eq. 21 (one factor per phase)
- :func:`clipped_surrogate` the bracket of Eq. 9/15: -min(r A, clip(r, 1-eps, 1+eps) A)
- :func:`kl_k3`             the beta D_KL(pi_theta || pi_ref) term, k3 estimator

Ratios are handled in log space (a model log-prob sums hundreds of per-token terms)
and exponentiated once, in :func:`clipped_surrogate`'s caller.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from mdmrl.errors import UserError
from mdmrl.estimators import kl_k3 as shared_kl_k3
from mdmrl.interfaces import PHASES, BuildContext, Objective, Policies
from mdmrl.trajectory import LossOutput, Trajectory


def ratio_model(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """log r_model,t = log pi_model,t - log pi_old model,t (Eq. 18-19), float [B].

    Both log-probs are sums over I_t^fill of per-token log-probs (Eq. 8), so the
    log-ratio is the sum of the per-token log-ratios of Eq. 19."""
    return new_log_prob.float() - old_log_prob.float()


def ratio_schedule(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """log r_schedule,t = log pi_schedule,t - log pi_old schedule,t (Eq. 20), float [B]."""
    return new_log_prob.float() - old_log_prob.float()


def ratio_phase(
    log_r_model: torch.Tensor | None, log_r_schedule: torch.Tensor | None, phase: str
) -> torch.Tensor:
    """log r_t(theta, phi) for a training phase, float [B] (Eq. 17 and 21).

    "model": the model factor only (Naive GRPO, and the n < N_m branch of Eq. 21);
    "schedule": the schedule factor only; "joint": their product, i.e. the sum of the
    logs (Eq. 17). A factor given as None is absent (a fixed schedule has no
    schedule factor: its ratio is exactly 1)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    parts = []
    if phase in ("model", "joint") and log_r_model is not None:
        parts.append(log_r_model)
    if phase in ("schedule", "joint") and log_r_schedule is not None:
        parts.append(log_r_schedule)
    if not parts:
        raise ValueError(f"phase {phase!r} has no ratio factor to train")
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample loss -min(r A, clip(r, 1 - eps, 1 + eps) A) of Eq. 9/15, float [B].

    ratio: r_t^g float [B]; advantages: A^g float [B]. With A > 0 the gradient is zero
    for r > 1 + eps; with A < 0 it is zero for r < 1 - eps; elsewhere it is -A dr.
    The clip is strict: exactly at r = 1 + eps (A > 0) or r = 1 - eps (A < 0) the
    gradient is the unclipped one. (Written with ``torch.minimum`` the two branches
    tie there and autograd would pass half the gradient; choosing the branch with
    :func:`clip_active` makes the boundary well defined.) The value equals the min
    form everywhere."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps, 1.0 + eps) * advantages
    return -torch.where(clip_active(ratio, advantages, eps), clipped, unclipped)


def clip_active(ratio: torch.Tensor, advantages: torch.Tensor, eps: float) -> torch.Tensor:
    """bool [B]: where the clipped branch of :func:`clipped_surrogate` is strictly
    smaller than the unclipped one, so the gradient is zero."""
    return ((advantages > 0) & (ratio > 1.0 + eps)) | ((advantages < 0) & (ratio < 1.0 - eps))


def kl_k3(new_log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """k3 estimate of D_KL(pi_theta || pi_ref) from samples of the rollout policy,
    float [B]: exp(d) - d - 1 with d = log pi_ref - log pi_theta (always >= 0).

    Used on the per-step model log-probs (the KL of Eq. 9/15 is on the model policy)."""
    return shared_kl_k3(new_log_prob, ref_log_prob)


@dataclass
class GRPOOptions:
    """Options of the ``grpo`` objective."""

    clip_eps: float = field(
        default=0.2,
        metadata={"doc": "PPO clip range epsilon of Eq. 9/15", "min_exclusive": 0.0, "max_exclusive": 1.0},
    )
    kl_beta: float = field(
        default=0.0,
        metadata={
            "doc": "weight beta of the KL to the frozen reference model (k3 estimator on the model "
            "policy); 0 as in the paper",
            "min": 0.0,
        },
    )
    adv_clip: float | None = field(
        default=None,
        metadata={
            "doc": "clamp advantages to [-adv_clip, adv_clip] (unset = no clamp)",
            "min_exclusive": 0.0,
        },
    )


@dataclass
class StepRatios:
    """The log-ratios of one denoising step (all float32 [B]).

    log_r_model / log_r_schedule: None when that factor is not part of the phase (or the
    schedule is fixed). new_model / new_schedule: current log-probs (None likewise)."""

    log_r: torch.Tensor
    log_r_model: torch.Tensor | None
    log_r_schedule: torch.Tensor | None
    new_model: torch.Tensor
    new_schedule: torch.Tensor | None


class GRPOObjective(Objective):
    """Co-GRPO's clipped GRPO surrogate (Eq. 15) on the phase's ratio (Eq. 17, 21).

    One loss term per denoising step, plus an optional KL to a reference model."""

    name = "grpo"
    Options = GRPOOptions

    def __init__(self, options: GRPOOptions | None = None):
        o = options or GRPOOptions()
        if not 0.0 < o.clip_eps < 1.0:
            raise UserError(f"objective.options.clip_eps: {o.clip_eps} must be in (0, 1)")
        if o.kl_beta < 0:
            raise UserError(f"objective.options.kl_beta: {o.kl_beta} must be >= 0")
        if o.adv_clip is not None and o.adv_clip <= 0:
            raise UserError(f"objective.options.adv_clip: {o.adv_clip} must be > 0 or unset")
        self.options = o
        self.eps = float(o.clip_eps)
        self.beta = float(o.kl_beta)

    @classmethod
    def from_options(cls, options: GRPOOptions, ctx: BuildContext) -> GRPOObjective:
        return cls(options)

    def num_terms(self, traj: Trajectory) -> int:
        """One term per denoising step: T."""
        return traj.num_steps

    def step_ratios(self, policies: Policies, traj: Trajectory, step: int, phase: str):
        """Replay ``step`` and return (:class:`StepRatios`, the replay).

        In the "schedule" phase the backbone runs without gradients (it is not trained
        and only supplies the features)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        sched = policies.schedule
        use_schedule = sched.stochastic and phase in ("schedule", "joint")
        use_model = phase in ("model", "joint")
        with nullcontext() if use_model else torch.no_grad():
            rep = policies.sampler.replay_step(policies.backbone, traj, step, policies.cond, policies.uncond)
        new_model = rep.model_log_prob.float()
        device = new_model.device
        log_r_model = ratio_model(new_model, traj.model_log_probs[:, step].to(device)) if use_model else None
        new_sched = log_r_sched = None
        if use_schedule:
            feats = rep.features if sched.needs_features else None
            new_sched = (
                sched.log_prob(step, traj.num_steps, feats, traj.raw_actions[:, step]).float().to(device)
            )
            log_r_sched = ratio_schedule(new_sched, traj.schedule_log_probs[:, step].to(device))
        log_r = ratio_phase(log_r_model, log_r_sched, phase)
        return StepRatios(log_r, log_r_model, log_r_sched, new_model, new_sched), rep

    def loss(
        self,
        policies: Policies,
        traj: Trajectory,
        advantages: torch.Tensor,
        terms: list[int],
        phase: str,
    ) -> LossOutput:
        """Mean over the batch and ``terms`` of the clipped surrogate (Eq. 15's 1/G 1/T),
        plus beta times the k3 KL to ``policies.reference`` when beta > 0 and the
        phase trains the model (the KL is a penalty: it is added to the loss).

        advantages: float32 [B]; terms: step indices in [0, T); phase: one of PHASES.
        """
        if not terms:
            raise ValueError("loss needs at least one term")
        if phase == "schedule" and not policies.schedule.stochastic:
            raise ValueError(
                f"phase 'schedule' needs a stochastic schedule policy; {policies.schedule.name!r} is fixed"
            )
        use_kl = self.beta > 0 and phase in ("model", "joint")
        if use_kl and policies.reference is None:
            raise UserError("objective.options.kl_beta > 0 needs a reference model, but none was provided")
        adv = advantages.float()
        if self.options.adv_clip is not None:
            adv = adv.clamp(-self.options.adv_clip, self.options.adv_clip)
        ref_cond = ref_uncond = None
        if use_kl:
            with torch.no_grad():
                ref_cond = policies.reference.encode_prompts(traj.prompts)
                ref_uncond = policies.reference.null_conditioning(traj.batch_size)

        total = None
        ratios, clipped, approx_kl, kl_ref, model_lp, sched_lp = [], [], [], [], [], []
        for t in terms:
            sr, _ = self.step_ratios(policies, traj, t, phase)
            a = adv.to(sr.log_r.device)
            r = torch.exp(sr.log_r)
            term = clipped_surrogate(r, a, self.eps).mean()
            if use_kl:
                with torch.no_grad():
                    ref = policies.sampler.replay_step(policies.reference, traj, t, ref_cond, ref_uncond)
                kl = kl_k3(sr.new_model, ref.model_log_prob.to(sr.new_model.device)).mean()
                term = term + self.beta * kl
                kl_ref.append(kl.detach())
            total = term if total is None else total + term
            rd = r.detach()
            ratios.append(rd)
            clipped.append(clip_active(rd, a, self.eps).float().mean())
            approx_kl.append(((rd - 1.0) - sr.log_r.detach()).mean())
            model_lp.append(sr.new_model.detach().mean())
            if sr.new_schedule is not None:
                sched_lp.append(sr.new_schedule.detach().mean())
        loss = total / len(terms)
        allr = torch.cat(ratios)
        stats = {
            "ratio_mean": float(allr.mean()),
            "ratio_min": float(allr.min()),
            "ratio_max": float(allr.max()),
            "clip_frac": float(torch.stack(clipped).mean()),
            "approx_kl": float(torch.stack(approx_kl).mean()),
            "model_logprob_mean": float(torch.stack(model_lp).mean()),
        }
        if sched_lp:
            stats["schedule_logprob_mean"] = float(torch.stack(sched_lp).mean())
            entropy = getattr(policies.schedule, "entropy", None)
            if callable(entropy):
                stats["schedule_entropy"] = float(entropy())
        if kl_ref:
            stats["kl_ref"] = float(torch.stack(kl_ref).mean())
        return LossOutput(loss=loss, stats=stats)
