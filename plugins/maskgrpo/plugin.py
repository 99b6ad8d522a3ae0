"""Registers MaskGRPO's parts: the ``mask-grpo`` objective and the ``emerge`` sampler."""

from __future__ import annotations

from mdmrl.hookspecs import hookimpl


@hookimpl
def register_objectives(register):
    from mdmrl_plugins.maskgrpo.objective import MaskGRPOObjective

    register(MaskGRPOObjective)


@hookimpl
def register_samplers(register):
    from mdmrl_plugins.maskgrpo.emerge import EmergeSampler

    register(EmergeSampler)
