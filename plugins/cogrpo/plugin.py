"""Registrations of the Co-GRPO family (heavy imports stay inside the hooks)."""

from mdmrl.hookspecs import hookimpl


@hookimpl
def register_samplers(register):
    from mdmrl_plugins.cogrpo.sampler import ConfidenceSampler

    register(ConfidenceSampler)


@hookimpl
def register_schedules(register):
    from mdmrl_plugins.cogrpo.schedules import FIXED_SCHEDULES

    for cls in FIXED_SCHEDULES:
        register(cls)


@hookimpl(specname="register_schedules")
def register_learned_schedules(register):
    from mdmrl_plugins.cogrpo.gaussian import GaussianSchedule

    register(GaussianSchedule)


@hookimpl
def register_objectives(register):
    from mdmrl_plugins.cogrpo.objective import GRPOObjective

    register(GRPOObjective)
