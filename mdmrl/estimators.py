"""Small estimators shared by objectives."""

from __future__ import annotations

import torch


def kl_k3(log_p: torch.Tensor, log_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimate of D_KL(p || ref) from samples of p: exp(d) - d - 1 with
    d = log_ref - log_p, float32 [B]. Computed as expm1(d) - d (no cancellation for
    small d) and floored at 0, so it is never negative."""
    d = log_ref.float() - log_p.float()
    return (torch.expm1(d) - d).clamp_min(0.0)
