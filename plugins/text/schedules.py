"""``llada``: LLaDA's linear schedule as a fixed schedule policy.

LLaDA's reverse process is linear: the expected number of tokens revealed is the same
at every step. With the block sampler's reading of the action's ``remask_ratio`` (the
fraction of the N completion positions still masked after the step), that is

    r_t = 1 - (t + 1) / T,   tau_s = temperature,   tau_r = remask_temperature,   s = cfg_scale,

which reveals exactly LLaDA's per-step counts whenever the block length is a multiple
of the steps per block (docs/text.md gives the rounding otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mdmrl_plugins.cogrpo.schedules import FixedSchedule, linear_ratio


@dataclass
class LLaDAScheduleOptions:
    """Options of the ``llada`` schedule."""

    temperature: float = field(
        default=0.0,
        metadata={
            "doc": "sampling temperature tau_s; 0 = the most likely token (LLaDA's default)",
            "min": 0.0,
        },
    )
    cfg_scale: float = field(
        default=1.0,
        metadata={
            "doc": "classifier-free guidance s (logits u + s (c - u); 1 = none); LLaDA's cfg_scale w is s = 1 + w",
            "min": 0.0,
        },
    )
    remask_temperature: float = field(
        default=0.0,
        metadata={
            "doc": "Gumbel-noise scale tau_r added to the low-confidence ranking (0 = LLaDA's ranking)",
            "min": 0.0,
        },
    )


class LLaDASchedule(FixedSchedule):
    """r = 1 - (t+1)/T (linear), tau_s, tau_r and s constants."""

    name = "llada"
    Options = LLaDAScheduleOptions

    def components(self, step: int, num_steps: int) -> torch.Tensor:
        o = self.options
        r = linear_ratio(step, num_steps).clamp(0.0, 1.0)
        values = [o.temperature, r, o.remask_temperature, o.cfg_scale]
        return torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in values])
