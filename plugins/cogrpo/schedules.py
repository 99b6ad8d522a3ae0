"""Fixed inference schedules: policies whose action A_t = (tau_s, r, tau_r, s) is a
pre-defined function of the step (Co-GRPO Table 1 and Table 2).

A fixed schedule is a :class:`~mdmrl.interfaces.SchedulePolicy` with ``stochastic =
False`` and ``needs_features = False``: :meth:`act` ignores the features and the
generator, returns the same action for every row, ``raw_actions == actions`` and a
log-prob of zero. Every schedule is defined for any step count T >= 1 (step t is
0-based). Formulas (docs/sampling.md has the same list):

- ``meissonic``: r = cos((t+1)/T * pi/2), tau_s = 1, tau_r = linspace(2, 0, T)[t]
  (Meissonic's scheduler), s = 9;
- ``meissonic-table1``: as ``meissonic`` but tau_r = 2^((T-t)/T) (Co-GRPO Table 1);
- ``cosine-gamma``: r = cos(pi (t+1) / (2T))^gamma (Table 2), tau_r by ``remask_schedule``;
- ``constant``: r = cos((t+1)/T * pi/2), tau_s, tau_r and s constants;
- ``amused``: aMUSEd's pipeline and ``AmusedScheduler`` (cosine or linear mask
  schedule, tau_r = linspace(start, end, T)[t], guidance scale 10, no sampling
  temperature), computed with the same float32 operations so that the confidence
  sampler reproduces aMUSEd's tokens exactly.

Values are computed in float32 with torch so that they are bit-identical to the
reference schedulers that compute them the same way.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext, SchedulePolicy
from mdmrl.trajectory import NUM_ACTIONS, is_guidance_free

REMASK_SCHEDULES = ("linear", "exponential", "constant")


# --------------------------------------------------------------------------- formulas


def step_ratio(step: int, num_steps: int) -> torch.Tensor:
    """(t + 1) / T as a float32 scalar tensor, computed as integer-tensor division (the
    way ``AmusedScheduler`` computes it)."""
    return (torch.tensor(step, dtype=torch.long) + 1) / num_steps


def cosine_ratio(step: int, num_steps: int) -> torch.Tensor:
    """Re-mask ratio r(t) = cos((t+1)/T * pi/2), float32 scalar tensor (Table 1)."""
    return torch.cos(step_ratio(step, num_steps) * math.pi / 2)


def linear_ratio(step: int, num_steps: int) -> torch.Tensor:
    """Re-mask ratio r(t) = 1 - (t+1)/T, float32 scalar tensor (aMUSEd's "linear")."""
    return 1 - step_ratio(step, num_steps)


def linear_temperature(start: float, end: float, step: int, num_steps: int) -> torch.Tensor:
    """tau_r(t) = linspace(start, end, T)[t] in float32 (Meissonic's and aMUSEd's
    scheduler): start at t = 0, end at t = T - 1; ``start`` when T = 1."""
    return torch.linspace(start, end, num_steps)[step]


def exponential_temperature(base: float, step: int, num_steps: int) -> torch.Tensor:
    """tau_r(t) = base^((T - t) / T), float32 scalar tensor (Table 1 with base 2)."""
    return torch.tensor(base, dtype=torch.float32) ** ((num_steps - step) / num_steps)


def _check_step(step: int, num_steps: int) -> None:
    if num_steps < 1 or not 0 <= step < num_steps:
        raise ValueError(f"step {step} outside 0..{num_steps - 1} (num_steps={num_steps})")


# --------------------------------------------------------------------------- base


class FixedSchedule(SchedulePolicy):
    """A schedule that is a fixed function of (t, T). Subclasses implement
    :meth:`components`."""

    stochastic = False
    needs_features = False

    def __init__(self, options=None):
        super().__init__()
        self.options = options if options is not None else self.Options()
        self._table: dict[tuple, tuple[torch.Tensor, bool]] = {}  # (step, T, options) -> ([1, K], s == 1)

    @classmethod
    def from_options(cls, options, ctx: BuildContext) -> FixedSchedule:
        return cls(options)

    @abstractmethod
    def components(self, step: int, num_steps: int) -> torch.Tensor:
        """The action of step ``step``, float32 [K] in :data:`ACTION_FIELDS` order."""

    def act(
        self,
        step: int,
        num_steps: int,
        batch_size: int,
        features: torch.Tensor | None,
        generator: torch.Generator | None,
        deterministic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fixed action for every row: (actions float32 [B, K], raw = actions,
        log_prob zeros [B]). Features and generator are not used; no noise is drawn."""
        actions = self._row(step, num_steps).expand(batch_size, NUM_ACTIONS).clone()
        return actions, actions.clone(), torch.zeros(batch_size, dtype=torch.float32)

    def _row(self, step: int, num_steps: int) -> torch.Tensor:
        """The action of step ``step``, float32 [1, K], computed once per (step, T, options)."""
        return self._entry(step, num_steps)[0]

    def _entry(self, step: int, num_steps: int) -> tuple[torch.Tensor, bool]:
        """(:meth:`_row`, whether its CFG scale is exactly 1), computed once per (step,
        T, options): the sampler asks both at every step."""
        _check_step(step, num_steps)
        key = (step, num_steps, repr(self.options))
        entry = self._table.get(key)
        if entry is None:
            a = self.components(step, num_steps).to(torch.float32).reshape(1, NUM_ACTIONS)
            entry = self._table[key] = (a, is_guidance_free(a))
        return entry

    def log_prob(
        self, step: int, num_steps: int, features: torch.Tensor | None, raw_actions: torch.Tensor
    ) -> torch.Tensor:
        """Zeros float32 [B]: a fixed schedule has no log-prob to learn."""
        return torch.zeros(raw_actions.shape[0], dtype=torch.float32, device=raw_actions.device)

    def guidance_free(self, step: int, num_steps: int) -> bool:
        """True when this step's CFG scale is exactly 1 (no guidance)."""
        return self._entry(step, num_steps)[1]


def _action(tau_s, r, tau_r, s) -> torch.Tensor:
    """Stack the components into float32 [K]; r is clamped to [0, 1] (a no-op except at
    t = T - 1, where float32 cos(pi/2) is -4e-8)."""
    vals = [torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in (tau_s, r, tau_r, s)]
    vals[1] = vals[1].clamp(0.0, 1.0)
    return torch.stack(vals)


def fixed_actions(schedule: SchedulePolicy, num_steps: int) -> torch.Tensor:
    """The deterministic action of every step, float32 [T, K] (for plots and tables).

    Works for any schedule policy (a learned one needs features and is not accepted)."""
    if schedule.needs_features:
        raise ValueError(f"schedule {schedule.name!r} needs backbone features; it has no fixed action table")
    rows = []
    with torch.no_grad():
        for t in range(num_steps):
            a, _, _ = schedule.act(t, num_steps, 1, None, None, deterministic=True)
            rows.append(a.reshape(NUM_ACTIONS).float().cpu())
    return torch.stack(rows)


# --------------------------------------------------------------------------- schedules


def _cfg_field(default: float):
    return field(
        default=default,
        metadata={"doc": "classifier-free guidance scale s (logits u + s (c - u); >= 0)", "min": 0.0},
    )


def _temp_field(default: float):
    return field(
        default=default,
        metadata={
            "doc": "sampling temperature tau_s (> 0; 1 = the model's distribution)",
            "min_exclusive": 0.0,
        },
    )


@dataclass
class MeissonicOptions:
    """Options of the ``meissonic`` and ``meissonic-table1`` schedules."""

    cfg_scale: float = _cfg_field(9.0)
    temperature: float = _temp_field(1.0)


class MeissonicSchedule(FixedSchedule):
    """Meissonic's inference schedule as its code runs it: r = cos((t+1)/T * pi/2),
    tau_s = 1, tau_r = linspace(2, 0, T)[t], s = 9."""

    name = "meissonic"
    Options = MeissonicOptions

    def remask_temperature(self, step: int, num_steps: int) -> torch.Tensor:
        return linear_temperature(2.0, 0.0, step, num_steps)

    def components(self, step: int, num_steps: int) -> torch.Tensor:
        o = self.options
        return _action(
            o.temperature,
            cosine_ratio(step, num_steps),
            self.remask_temperature(step, num_steps),
            o.cfg_scale,
        )


class MeissonicTable1Schedule(MeissonicSchedule):
    """Co-GRPO Table 1 as printed: as ``meissonic`` but tau_r = 2^((T-t)/T)."""

    name = "meissonic-table1"

    def remask_temperature(self, step: int, num_steps: int) -> torch.Tensor:
        return exponential_temperature(2.0, step, num_steps)


@dataclass
class CosineGammaOptions:
    """Options of the ``cosine-gamma`` schedule."""

    gamma: float = field(
        default=1.0,
        metadata={
            "doc": "exponent of the mask ratio r = cos(pi (t+1) / (2T))^gamma (Table 2)",
            "min_exclusive": 0.0,
        },
    )
    cfg_scale: float = _cfg_field(9.0)
    temperature: float = _temp_field(1.0)
    remask_schedule: str = field(
        default="linear",
        metadata={
            "doc": "re-mask temperature: linear = linspace(remask_temperature, 0, T)[t]; exponential = "
            "remask_temperature^((T-t)/T); constant = remask_temperature",
            "choices": list(REMASK_SCHEDULES),
        },
    )
    remask_temperature: float = field(
        default=2.0,
        metadata={"doc": "start (linear), base (exponential) or value (constant) of tau_r", "min": 0.0},
    )


class CosineGammaSchedule(FixedSchedule):
    """Table 2's perturbed cosine: r = cos(pi (t+1) / (2T))^gamma; tau_s, s constants;
    tau_r following ``remask_schedule``."""

    name = "cosine-gamma"
    Options = CosineGammaOptions

    def __init__(self, options: CosineGammaOptions | None = None):
        super().__init__(options)
        o = self.options
        if o.remask_schedule not in REMASK_SCHEDULES:
            raise UserError(
                f"schedule.options.remask_schedule: {o.remask_schedule!r}; choose one of {', '.join(REMASK_SCHEDULES)}"
            )
        if o.gamma <= 0:
            raise UserError(f"schedule.options.gamma: {o.gamma} must be greater than 0")

    def components(self, step: int, num_steps: int) -> torch.Tensor:
        o = self.options
        r = cosine_ratio(step, num_steps).clamp_min(0.0) ** o.gamma
        if o.remask_schedule == "linear":
            tau_r = linear_temperature(o.remask_temperature, 0.0, step, num_steps)
        elif o.remask_schedule == "exponential":
            tau_r = exponential_temperature(o.remask_temperature, step, num_steps)
        else:
            tau_r = o.remask_temperature
        return _action(o.temperature, r, tau_r, o.cfg_scale)


@dataclass
class ConstantOptions:
    """Options of the ``constant`` schedule."""

    temperature: float = _temp_field(1.0)
    remask_temperature: float = field(
        default=1.0, metadata={"doc": "re-mask temperature tau_r (Gumbel-noise scale, >= 0)", "min": 0.0}
    )
    cfg_scale: float = _cfg_field(9.0)


class ConstantSchedule(FixedSchedule):
    """tau_s, tau_r and s constant; r = cos((t+1)/T * pi/2)."""

    name = "constant"
    Options = ConstantOptions

    def components(self, step: int, num_steps: int) -> torch.Tensor:
        o = self.options
        return _action(o.temperature, cosine_ratio(step, num_steps), o.remask_temperature, o.cfg_scale)


@dataclass
class AmusedScheduleOptions:
    """Options of the ``amused`` schedule (the arguments of aMUSEd's pipeline)."""

    guidance_scale: float = field(
        default=10.0,
        metadata={"doc": "the pipeline's guidance_scale; values <= 1 disable guidance (s = 1) as there"},
    )
    masking_schedule: str = field(
        default="cosine",
        metadata={
            "doc": "AmusedScheduler masking_schedule: cosine r = cos((t+1)/T * pi/2), linear r = 1 - (t+1)/T",
            "choices": ["cosine", "linear"],
        },
    )
    temperature_start: float = field(
        default=2.0,
        metadata={"doc": "first value of the re-mask temperature ramp (the pipeline's temperature[0])"},
    )
    temperature_end: float = field(
        default=0.0,
        metadata={"doc": "last value of the re-mask temperature ramp (the pipeline's temperature[1])"},
    )


class AmusedSchedule(FixedSchedule):
    """aMUSEd's schedule: tau_s = 1 (the pipeline samples from softmax of the guided
    logits), r from the scheduler's masking schedule, tau_r = linspace(start, end, T)[t]
    (``AmusedScheduler.set_timesteps``), s = the pipeline's guidance scale."""

    name = "amused"
    Options = AmusedScheduleOptions

    def __init__(self, options: AmusedScheduleOptions | None = None):
        super().__init__(options)
        if self.options.masking_schedule not in ("cosine", "linear"):
            raise UserError(
                f"schedule.options.masking_schedule: {self.options.masking_schedule!r}; choose cosine or linear"
            )

    def components(self, step: int, num_steps: int) -> torch.Tensor:
        o = self.options
        r = cosine_ratio(step, num_steps) if o.masking_schedule == "cosine" else linear_ratio(step, num_steps)
        tau_r = linear_temperature(o.temperature_start, o.temperature_end, step, num_steps)
        s = o.guidance_scale if o.guidance_scale > 1.0 else 1.0
        return _action(1.0, r, tau_r, s)


FIXED_SCHEDULES: tuple[type[FixedSchedule], ...] = (
    MeissonicSchedule,
    MeissonicTable1Schedule,
    CosineGammaSchedule,
    ConstantSchedule,
    AmusedSchedule,
)
