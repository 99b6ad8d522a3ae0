"""The five plug-in parts of mdmrl, plus the prompt source that feeds them.

Each part is an abstract class. An implementation is registered with the plug-in
manager under a ``name`` (see :mod:`mdmrl.hookspecs`) and built from a recipe table by
:meth:`Part.from_options`. Every implementation declares its recipe options as a
dataclass ``Options``; the recipe loader validates the recipe's ``options`` table
against it (unknown keys, types, ranges) before anything heavy runs.

Shapes use the letters documented in :mod:`mdmrl.trajectory`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mdmrl.errors import UserError
from mdmrl.trajectory import BackboneOutput, Conditioning, LossOutput, Trajectory


@dataclass
class NoOptions:
    """Options of a part that takes none."""


@dataclass
class BuildContext:
    """What the engine knows when it builds a part.

    device: where tensors and modules live.
    backbone: the already-built backbone (None while the backbone itself is built).
    recipe_dir: folder of the recipe file, for resolving relative paths in options.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backbone: Backbone | None = None
    recipe_dir: str = "."


class Part:
    """Mixin shared by every part: a registered name and an options dataclass."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    @classmethod
    def from_options(cls, options: Any, ctx: BuildContext) -> Part:
        """Build the part from its validated options. Override when construction
        needs the context (device, backbone, paths)."""
        return cls(options)  # type: ignore[call-arg]


class Backbone(Part, nn.Module, ABC):
    """A masked-token image model: logits for every position of a token grid.

    Attributes (set by implementations):
        codebook_size: V, the number of image-token ids the model can emit (0..V-1).
        mask_token_id: the id of the mask token (>= V; never emitted).
        grid_shape: (H, W) of the token grid; N = H * W.
        feature_dim: D, the width of :attr:`BackboneOutput.features`.
    """

    codebook_size: int
    mask_token_id: int
    grid_shape: tuple[int, int]
    feature_dim: int

    @property
    def num_tokens(self) -> int:
        h, w = self.grid_shape
        return h * w

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode B prompts into a :class:`Conditioning` with batch B on this device."""

    def null_conditioning(self, batch_size: int) -> Conditioning:
        """The classifier-free-guidance null condition (empty prompt), batch B."""
        return self.encode_prompts([""] * batch_size)

    @abstractmethod
    def forward(self, tokens: torch.Tensor, cond: Conditioning, timestep: torch.Tensor) -> BackboneOutput:
        """One denoising forward pass.

        tokens: long [B, N], ids in 0..V-1 or ``mask_token_id``.
        cond: conditioning with batch B.
        timestep: float32 [B] in [0, 1], the fraction of the N positions still masked
            in ``tokens`` (1 = all masked). Backbones map it to their own convention.
        Returns logits float32 [B, N, V] and features [B, N, D].
        """

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Finished token grids long [B, N] (no mask) -> images float32 [B, 3, H_img, W_img] in [0, 1]."""

    def export(self, out_dir: Path) -> dict[str, Any]:
        """Optional (``mdmrl export``): write this backbone's current weights into the
        empty folder ``out_dir`` as a standalone model in its own family's format, one
        that loads without mdmrl where the family has a library (a diffusers folder, a
        transformers-style checkpoint folder) and through this backbone's own options
        (its weights path) in a recipe. LoRA adapters are merged into the weights
        (:func:`mdmrl.weights.merged_state_dict`). Called on the CPU, in eval mode,
        without gradients, after a checkpoint's trained weights were loaded.

        Returns a JSON-serialisable dict that ``mdmrl export`` records in the folder's
        ``mdmrl-export.json``: at least ``format`` (what was written) and ``load`` (how
        to load it). A backbone that does not override this method cannot export;
        ``mdmrl export`` says so in one line before loading anything."""
        raise UserError(f"backbone {self.name!r} cannot export (it has no export method)")


class NullConditioningCache:
    """A backbone's null condition (the encoding of B empty prompts), computed once and
    reused while the weights that compute it stay the same: every rollout asks for it,
    and it depends on nothing else. A backbone keeps one and answers
    :meth:`Backbone.null_conditioning` with :meth:`get`.

    The value is kept under a key of the batch size, ``extra`` (e.g. the output dtype)
    and, for every tensor the encoding reads, its device, storage address and in-place
    version counter (an optimizer step or ``load_state_dict`` changes it); another key
    computes it again. While gradients are on and one of those tensors requires grad,
    the value is never reused: the encoding must then be part of the autograd graph
    (a text tower that is trained gets its gradient from the null branch too). The kept
    tensors are ordinary ones, made outside inference mode without autograd, so they
    can be used later with autograd on; callers must not modify them in place
    (``Conditioning.cat`` copies them)."""

    def __init__(self) -> None:
        self._entry: tuple[tuple, Conditioning] | None = None

    def get(
        self,
        batch_size: int,
        tensors: Iterable[torch.Tensor],
        compute: Callable[[], Conditioning],
        extra: Hashable = None,
    ) -> Conditioning:
        """``compute()`` (the backbone's encoding of ``[""] * batch_size``), or the kept
        result of an earlier call with the same key. ``tensors``: the parameters and
        buffers the encoding reads."""
        tensors = list(tensors)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return compute()
        key = (int(batch_size), extra, tuple((t.device, t.data_ptr(), t._version) for t in tensors))
        if self._entry is None or self._entry[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._entry = (key, compute())
        return self._entry[1]

    def empty_prompts(
        self, backbone: Backbone, batch_size: int, tensors: Iterable[torch.Tensor], extra: Hashable = None
    ) -> Conditioning:
        """:meth:`get` of ``backbone.encode_prompts([""] * batch_size)``: the body of a
        backbone's :meth:`Backbone.null_conditioning`."""
        b = int(batch_size)
        return self.get(b, tensors, lambda: backbone.encode_prompts([""] * b), extra)


class SchedulePolicy(Part, nn.Module, ABC):
    """Chooses the schedule action A_t = (tau_s, r, tau_r, s) at every step (Eq. 14).

    A fixed schedule is a policy with ``stochastic = False`` whose log-prob is 0.
    """

    #: True when actions are sampled (and so have a log-prob that training can use).
    stochastic: ClassVar[bool] = False
    #: True when :meth:`act` needs the backbone's final-layer token features.
    needs_features: ClassVar[bool] = False

    @abstractmethod
    def act(
        self,
        step: int,
        num_steps: int,
        batch_size: int,
        features: torch.Tensor | None,
        generator: torch.Generator | None,
        deterministic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose the action for step ``step`` of ``num_steps`` (0-based).

        features: float [B, N, D] of the current state V^(step), or None when
            ``needs_features`` is False.
        deterministic: take the mean action instead of sampling (evaluation).
        Returns (actions float32 [B, K] in valid units, raw float32 [B, K] the
        unconstrained sample, log_prob float32 [B]; zeros for fixed schedules).
        """

    @abstractmethod
    def log_prob(
        self, step: int, num_steps: int, features: torch.Tensor | None, raw_actions: torch.Tensor
    ) -> torch.Tensor:
        """log pi_schedule,t of recorded unconstrained actions raw float [B, K] -> float32 [B]
        (differentiable in the policy's parameters)."""

    def guidance_free(self, step: int, num_steps: int) -> bool:
        """True when every action this policy can choose at ``step`` has CFG scale s = 1
        exactly, so a sampler may run the conditional forward alone (batch B instead
        of 2B) before the action is drawn. The default, False, is always safe."""
        return False


@dataclass
class StepReplay:
    """A recomputed step of a trajectory (for the objectives).

    model_log_prob: float32 [B], log pi_model,t of the filled tokens under the
        current backbone and the recorded action (differentiable in the backbone).
    features: float [B, N, D], detached final-layer features of V^(t) (conditional
        branch), the schedule policy's input.
    """

    model_log_prob: torch.Tensor
    features: torch.Tensor


class Sampler(Part, ABC):
    """Turns a backbone and a schedule policy into trajectories."""

    @abstractmethod
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
        """Generate B = len(prompts) images in ``num_steps`` steps.

        seeds: long [B]; trajectory b draws all its randomness from a generator
            seeded with seeds[b], so it is reproducible on its own.
        Runs without gradients and returns a validated :class:`Trajectory`.
        """

    @abstractmethod
    def replay_step(
        self,
        backbone: Backbone,
        traj: Trajectory,
        step: int,
        cond: Conditioning,
        uncond: Conditioning,
    ) -> StepReplay:
        """Recompute step ``step`` of ``traj`` with the current backbone (with
        gradients when they are enabled). cond/uncond: batch B."""


@dataclass
class GeneratedBatch:
    """Finished samples handed to a :class:`Rewarder`.

    prompts: B strings; tokens: long [B, N]; grid_shape: (H, W) of the token grid.
    images: float32 [B, 3, H_img, W_img] in [0, 1], decoded on first use.
    """

    prompts: list[str]
    tokens: torch.Tensor
    grid_shape: tuple[int, int]
    decode_fn: Any = None
    _images: torch.Tensor | None = None

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            if self.decode_fn is None:
                raise RuntimeError("GeneratedBatch has no decoder for images")
            self._images = self.decode_fn(self.tokens)
        return self._images


class Rewarder(Part, ABC):
    """Scores finished samples. Higher is better."""

    @abstractmethod
    def score(self, batch: GeneratedBatch) -> torch.Tensor:
        """Return float32 [B] on CPU, one score per sample."""


@dataclass
class Policies:
    """The trainable and frozen parts an objective reads.

    reference: frozen copy of the backbone for the KL term, or None when beta = 0.
    cond/uncond: conditioning of ``traj.prompts`` and the null prompt, batch B.
    """

    backbone: Backbone
    schedule: SchedulePolicy
    sampler: Sampler
    cond: Conditioning
    uncond: Conditioning
    reference: Backbone | None = None


#: Which parameters an update trains (Eq. 21): the model, the schedule, or both.
PHASES = ("model", "schedule", "joint")


class Objective(Part, ABC):
    """A policy-gradient loss over trajectories.

    The engine splits a batch's loss into ``num_terms(traj)`` terms (denoising steps
    for Co-GRPO, mask levels for MaskGRPO), may train on a subset of them, and calls
    :meth:`loss` on chunks of terms, back-propagating each chunk separately.
    """

    #: True when every term is its own optimizer step (MaskGRPO's inner updates).
    update_per_term: ClassVar[bool] = False
    #: Phases this objective can train.
    phases: ClassVar[tuple[str, ...]] = PHASES

    def prepare(self, policies: Policies, traj: Trajectory) -> None:
        """Called once per rollout batch, after rewards and before any update, with the
        rollout's (old) weights: the place to compute old-policy quantities that the
        sampler did not record (MaskGRPO's old ELBO). Default: nothing."""

    @abstractmethod
    def num_terms(self, traj: Trajectory) -> int:
        """How many loss terms one trajectory batch has."""

    @abstractmethod
    def loss(
        self,
        policies: Policies,
        traj: Trajectory,
        advantages: torch.Tensor,
        terms: list[int],
        phase: str,
    ) -> LossOutput:
        """Mean loss over the batch and the listed terms.

        advantages: float32 [B]. phase: one of :data:`PHASES`.
        """


class PromptSource(Part, ABC):
    """Where prompts come from: a training stream and a fixed evaluation list."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """Draw n training prompts using only ``generator`` for randomness."""

    @abstractmethod
    def evaluation(self) -> list[str]:
        """The fixed, ordered list of held-out evaluation prompts."""

    def categorize(self, prompts: list[str]) -> list[str]:
        """A category per prompt for per-category evaluation tables (e.g. the
        GenEval-style family of a shapes prompt). Default: every prompt is "all"."""
        return ["all"] * len(prompts)


#: Part kinds, in the order the CLI lists them, mapped to their base classes.
KINDS: dict[str, type] = {
    "backbone": Backbone,
    "schedule": SchedulePolicy,
    "sampler": Sampler,
    "rewarder": Rewarder,
    "objective": Objective,
    "prompts": PromptSource,
}
