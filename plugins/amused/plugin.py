"""Registrations of the aMUSEd family (diffusers and transformers load inside the hook's class)."""

from mdmrl.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    from mdmrl_plugins.amused.backbone import AmusedBackbone

    register(AmusedBackbone)
