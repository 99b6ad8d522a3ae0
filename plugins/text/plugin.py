"""Registrations of the text parts (heavy imports stay inside the hooks)."""

from mdmrl.hookspecs import hookimpl


@hookimpl
def register_samplers(register):
    from mdmrl_plugins.text.block import BlockSampler

    register(BlockSampler)


@hookimpl
def register_schedules(register):
    from mdmrl_plugins.text.schedules import LLaDASchedule

    register(LLaDASchedule)


@hookimpl
def register_rewarders(register):
    from mdmrl_plugins.text.gsm8k import GSM8KCorrect, GSM8KFormat, GSM8KInteger

    register(GSM8KFormat)
    register(GSM8KInteger)
    register(GSM8KCorrect)

    from mdmrl_plugins.text.arith import ArithCorrect, ArithFormat

    register(ArithFormat)
    register(ArithCorrect)


@hookimpl
def register_prompt_sources(register):
    from mdmrl_plugins.text.gsm8k import GSM8KPrompts

    register(GSM8KPrompts)

    from mdmrl_plugins.text.arith import ArithHeldoutPrompts, ArithTrainPrompts

    register(ArithTrainPrompts)
    register(ArithHeldoutPrompts)
