"""Processes, devices and gradient synchronisation through ``accelerate.Accelerator``.

One process is the default; ``accelerate launch`` (or ``mdmrl run --num-processes N``
or ``--accelerate-config FILE``) starts several, and :func:`setup` joins them. The
accelerator owns the process group, the wrapping of the trained modules (DDP, FSDP or
DeepSpeed, as the launch configuration says), mixed precision, and the gradient
synchronisation that the engine skips (``no_sync``) on all but the last backward pass
of an optimizer step.

Sharding rule: trajectory ``b`` of an iteration's global batch belongs to rank
``b % world_size``. Every rank draws the same prompts and per-trajectory seeds, and a
trajectory's randomness comes only from its own seed, so a trajectory is identical
whichever rank samples it. Rewards are summed into a global tensor (each position
written by exactly one rank) and advantages are computed from the global rewards on
every rank. Each rank's loss is scaled by (local samples / global samples) times the
number of processes, so the data-parallel engine's mean of the ranks' gradients is
the gradient of the global batch: the effective batch and the update do not depend on
the number of processes.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

from mdmrl.errors import UserError


@dataclass
class Dist:
    """The run's accelerator and its process layout."""

    accelerator: object  # accelerate.Accelerator (imported lazily: it is slow to import)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def local_rank(self) -> int:
        return self.accelerator.local_process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def engine(self) -> str:
        """accelerate's distributed type: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED ..."""
        return str(self.accelerator.distributed_type).split(".")[-1]

    @property
    def sharded(self) -> bool:
        """Whether model or optimizer state is split across the ranks."""
        return self.engine in ("FSDP", "DEEPSPEED")

    def local_indices(self, n: int) -> torch.Tensor:
        return torch.arange(self.rank, n, self.world_size)

    def scatter_sum(self, local_values: torch.Tensor, local_idx: torch.Tensor, n: int) -> torch.Tensor:
        """Global float64 tensor [n] from each rank's values at its indices (exact)."""
        out = torch.zeros(n, dtype=torch.float64)
        out[local_idx] = local_values.to(torch.float64).cpu()
        if self.active:
            out = self.accelerator.reduce(out.to(self.accelerator.device), "sum").cpu()
        return out

    def barrier(self) -> None:
        if self.active:
            self.accelerator.wait_for_everyone()

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, "sum").item() > 0)


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_deepspeed() -> None:
    """One clear line when the launch configuration selects DeepSpeed without it."""
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            "the accelerate configuration selects DeepSpeed, which is not installed; "
            "install it with: pip install 'mdmrl[deepspeed]'"
        )


def setup(mixed_precision: str = "no", device: torch.device | None = None) -> Dist:
    """The accelerator of this process: joins the process group started by
    ``accelerate launch``/torchrun, if any, and applies the recipe's
    ``train.mixed_precision``. A launch configuration that names another mixed
    precision than the recipe is a UserError (the recipe is what a resume replays)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("no", mixed_precision):
        raise UserError(
            f"the accelerate configuration sets mixed_precision {launched!r} but the recipe's "
            f"train.mixed_precision is {mixed_precision!r}; make them equal "
            f"(e.g. --set train.mixed_precision={launched})"
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        check_deepspeed()
    if _launched_world() <= 1 and AcceleratorState._shared_state:
        # One process that builds several trainers (tests, benchmarks): each gets the
        # mixed precision and device of its own recipe.
        AcceleratorState._reset_state()
    cpu = device is not None and device.type == "cpu"
    dist = Dist(
        Accelerator(
            mixed_precision=mixed_precision,
            cpu=cpu,
            device_placement=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and dist.engine != "FSDP":
        # accelerate switches to FSDP only on accelerator devices; on CPU it would
        # silently run plain data parallelism with every process holding everything.
        raise UserError(
            f"the accelerate configuration selects FSDP, which accelerate runs on GPUs only "
            f"(this run's processes are {dist.engine} on {dist.accelerator.device.type}); "
            "use configs/accelerate/ddp.yaml on CPU"
        )
    return dist


def shutdown(together: bool = False, timeout_s: float = 60.0) -> None:
    """Leave the process group, if this process joined one. Exiting with a live gloo
    group can abort the interpreter at shutdown ("terminate called without an active
    exception"), which fails a run that had finished.

    together: the command finished normally, so every process is on its way here;
    on gloo, wait (at most ``timeout_s``) until all have arrived, so that no process
    tears its connections down while another still holds them (a process that left
    first could abort the same way). A process that does not arrive in time, or a
    failed command (``together`` False), leaves at once."""
    if not (td.is_available() and td.is_initialized()):
        return
    if together and td.get_world_size() > 1 and td.get_backend() == "gloo":
        from datetime import timedelta

        try:
            td.monitored_barrier(timeout=timedelta(seconds=timeout_s))
        except RuntimeError:  # another process failed or is gone: leave anyway
            pass
    td.destroy_process_group()
