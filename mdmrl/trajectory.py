"""The records that cross plug-in boundaries.

Every tensor that one plug-in hands to another travels in one of these dataclasses,
never in a loose dict. Shapes use these letters throughout the project:

- ``B``: batch (number of trajectories), ``T``: denoising steps, ``N``: image tokens
  per sample (``H * W`` of the token grid), ``V``: codebook size (the logits' last
  dimension; the mask id is never a valid output), ``D``: feature width, ``L``: text
  tokens, ``K``: number of schedule action components (4).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

#: The schedule action A_t = (tau_s, r, tau_r, s), in this order along the last axis.
ACTION_FIELDS: tuple[str, ...] = (
    "temperature",  # tau_s: sampling temperature, > 0
    "remask_ratio",  # r: fraction of all N positions left masked after the step, in [0, 1]
    "remask_temperature",  # tau_r: Gumbel-noise scale of the re-mask confidence, >= 0
    "cfg_scale",  # s: classifier-free guidance scale, logits = u + s * (c - u)
)
NUM_ACTIONS = len(ACTION_FIELDS)


def is_guidance_free(actions: torch.Tensor) -> bool:
    """True when every row of the actions float [B, K] has CFG scale s = 1 exactly (a
    guidance-free step: samplers run the conditional forward alone)."""
    return bool((actions[:, ACTION_FIELDS.index("cfg_scale")] == 1.0).all())


@dataclass
class Conditioning:
    """Text conditioning produced by :meth:`Backbone.encode_prompts`.

    hidden: float [B, L, D_text], per-token text states.
    pooled: float [B, P] or None, one pooled vector per prompt.
    attention_mask: bool [B, L] or None, True for real (non-padding) text tokens.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def map(self, fn) -> Conditioning:
        """Apply ``fn`` to every tensor field (None stays None)."""
        return Conditioning(
            **{f.name: (None if (v := getattr(self, f.name)) is None else fn(v)) for f in fields(self)}
        )

    def index(self, idx) -> Conditioning:
        return self.map(lambda t: t[idx])

    def repeat_interleave(self, n: int) -> Conditioning:
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    def to(self, device) -> Conditioning:
        return self.map(lambda t: t.to(device))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch; all items must share L (pad before if not)."""
        first = items[0]
        out = {}
        for f in fields(Conditioning):
            vals = [getattr(c, f.name) for c in items]
            if all(v is None for v in vals):
                out[f.name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"Conditioning.cat: field {f.name!r} is None in some items only")
            else:
                out[f.name] = torch.cat(vals, dim=0)
        del first
        return Conditioning(**out)


@dataclass
class BackboneOutput:
    """What one backbone forward returns.

    logits: float32 [B, N, V] over the codebook (no mask entry).
    features: float [B, N, D] final-layer token features (input to the schedule policy).
    """

    logits: torch.Tensor
    features: torch.Tensor


@dataclass
class Trajectory:
    """One batch of generation trajectories, as recorded by a :class:`Sampler`.

    tokens: long [B, T+1, N]. ``tokens[:, t]`` is the state V^(t) *before* step t;
        ``tokens[:, 0]`` is all mask, ``tokens[:, T]`` is the finished image (no mask).
    filled: bool [B, T, N]. Positions masked in V^(t) and unmasked in V^(t+1): the
        index set I_t^fill of Eq. 8. A position is filled exactly once.
    actions: float32 [B, T, K]. The schedule action used at step t, components in
        :data:`ACTION_FIELDS` order, in valid (constrained) units.
    raw_actions: float32 [B, T, K]. The schedule policy's unconstrained sample (the
        variable its Gaussian log-prob is defined on); equals ``actions`` for fixed
        schedules.
    model_log_probs: float32 [B, T]. Old log pi_model,t: the sum over I_t^fill of the
        log-prob of the filled token under the guided, tempered distribution that
        sampled it (Eq. 8/19), computed by the rollout policy.
    schedule_log_probs: float32 [B, T]. Old log pi_schedule,t (Eq. 14/20); zeros when
        the schedule is fixed.
    seeds: long [B]. Per-trajectory seed the sampler's generator was built from.
    prompts: list of B prompt strings.
    group_ids: long [B]. Trajectories with the same id share a prompt (a GRPO group).
    """

    tokens: torch.Tensor
    filled: torch.Tensor
    actions: torch.Tensor
    raw_actions: torch.Tensor
    model_log_probs: torch.Tensor
    schedule_log_probs: torch.Tensor
    seeds: torch.Tensor
    prompts: list[str]
    group_ids: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_steps(self) -> int:
        return self.filled.shape[1]

    @property
    def final_tokens(self) -> torch.Tensor:
        """long [B, N]: the finished token grid V^(T)."""
        return self.tokens[:, -1]

    def validate(self, mask_token_id: int) -> None:
        """Raise ValueError if the record is internally inconsistent."""
        b, t1, n = self.tokens.shape
        t = t1 - 1
        expect = {
            "filled": (b, t, n),
            "actions": (b, t, NUM_ACTIONS),
            "raw_actions": (b, t, NUM_ACTIONS),
            "model_log_probs": (b, t),
            "schedule_log_probs": (b, t),
            "seeds": (b,),
            "group_ids": (b,),
        }
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"Trajectory.{name} has shape {got}, expected {shape}")
        if len(self.prompts) != b:
            raise ValueError(f"Trajectory.prompts has {len(self.prompts)} items, expected {b}")
        masked = self.tokens == mask_token_id
        if not bool(masked[:, 0].all()):
            raise ValueError("Trajectory.tokens[:, 0] must be all mask")
        if bool(masked[:, -1].any()):
            raise ValueError("Trajectory.tokens[:, -1] must contain no mask")
        fill = masked[:, :-1] & ~masked[:, 1:]
        if not torch.equal(fill, self.filled):
            raise ValueError("Trajectory.filled disagrees with the mask transitions of tokens")
        if bool((~masked[:, :-1] & masked[:, 1:]).any()):
            raise ValueError("Trajectory.tokens re-masks a position that was already decoded")

    def select(self, idx: torch.Tensor) -> Trajectory:
        """Sub-batch by a long index tensor over B."""
        il = idx.tolist()
        return replace(
            self,
            tokens=self.tokens[idx],
            filled=self.filled[idx],
            actions=self.actions[idx],
            raw_actions=self.raw_actions[idx],
            model_log_probs=self.model_log_probs[idx],
            schedule_log_probs=self.schedule_log_probs[idx],
            seeds=self.seeds[idx],
            prompts=[self.prompts[i] for i in il],
            group_ids=self.group_ids[idx],
        )

    @staticmethod
    def cat(items: list[Trajectory]) -> Trajectory:
        """Concatenate along the batch (all items must share T and N)."""
        return Trajectory(
            tokens=torch.cat([x.tokens for x in items]),
            filled=torch.cat([x.filled for x in items]),
            actions=torch.cat([x.actions for x in items]),
            raw_actions=torch.cat([x.raw_actions for x in items]),
            model_log_probs=torch.cat([x.model_log_probs for x in items]),
            schedule_log_probs=torch.cat([x.schedule_log_probs for x in items]),
            seeds=torch.cat([x.seeds for x in items]),
            prompts=[p for x in items for p in x.prompts],
            group_ids=torch.cat([x.group_ids for x in items]),
        )


@dataclass
class RewardResult:
    """Per-image rewards.

    total: float32 [B], the weighted sum used for advantages.
    components: name -> float32 [B], each component's unweighted score (for logging).
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor]


@dataclass
class LossOutput:
    """What :meth:`Objective.loss` returns.

    loss: scalar tensor to minimise (has grad when any trainable part took part).
    stats: scalar diagnostics (ratio mean/min/max, clip fraction, KL, ...), as floats.
    """

    loss: torch.Tensor
    stats: dict[str, float]
