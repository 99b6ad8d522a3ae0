"""Multi-process helpers. One process is the default; ``accelerate launch`` (or
``mdmrl run --num-processes N``) starts several, and :func:`setup` joins them.

Sharding rule: trajectory ``b`` of an iteration's global batch belongs to rank
``b % world_size``. Every rank draws the same prompts and per-trajectory seeds, and a
trajectory's randomness comes only from its own seed, so a trajectory is identical
whichever rank samples it. Rewards are summed into a global tensor (each position
written by exactly one rank), advantages are computed from the global rewards on
every rank, and gradients are all-reduced with a SUM of per-rank losses that were
already scaled by (local samples / global samples): the effective batch and the
update do not depend on the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def local_indices(self, n: int) -> torch.Tensor:
        return torch.arange(self.rank, n, self.world_size)

    def scatter_sum(self, local_values: torch.Tensor, local_idx: torch.Tensor, n: int) -> torch.Tensor:
        """Global float64 tensor [n] from each rank's values at its indices (exact)."""
        out = torch.zeros(n, dtype=torch.float64)
        out[local_idx] = local_values.to(torch.float64).cpu()
        if self.active:
            td.all_reduce(out, op=td.ReduceOp.SUM)
        return out

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            td.all_reduce(p.grad, op=td.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.active:
            td.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0])
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t.item())


def setup() -> Dist:
    """Join the process group started by ``accelerate launch``/torchrun, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not td.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return Dist(
        rank=td.get_rank(), world_size=td.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0))
    )


def shutdown() -> None:
    """Leave the process group, if this process joined one. Exiting with a live gloo
    group can abort the interpreter at shutdown ("terminate called without an active
    exception"), which fails a run that had finished."""
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
