"""Registrations of the shapes family (the embedded world)."""

from mdmrl.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    from mdmrl_plugins.shapes.model import ShapesMDM

    register(ShapesMDM)


@hookimpl
def register_rewarders(register):
    from mdmrl_plugins.shapes.rewards import ShapesAlignment, ShapesClean, ShapesQuality

    register(ShapesAlignment)
    register(ShapesQuality)
    register(ShapesClean)


@hookimpl
def register_prompt_sources(register):
    from mdmrl_plugins.shapes.prompts import ShapesHeldoutPrompts, ShapesTrainPrompts

    register(ShapesTrainPrompts)
    register(ShapesHeldoutPrompts)
