"""Group-relative advantages (GRPO, Eq. 9 and 15 of Co-GRPO)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_g = (R_g - mean(R_group)) / (std(R_group) + eps), per group of equal ``group_ids``.

    rewards: float [B]; group_ids: long [B]. The standard deviation is the population
    one (unbiased=False), so a group whose rewards are all equal gets zero advantages.
    Returns float32 [B].
    """
    rewards = rewards.to(torch.float64)
    ids, inverse = torch.unique(group_ids, return_inverse=True)
    g = ids.numel()
    count = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    total = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, rewards)
    mean = total / count
    centred = rewards - mean[inverse]
    var = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, centred**2) / count
    return (centred / (var.sqrt()[inverse] + eps)).to(torch.float32)
