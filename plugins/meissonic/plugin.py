"""Registrations of the Meissonic family (heavy imports stay inside the hook)."""

from mdmrl.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    from mdmrl_plugins.meissonic.backbone import MeissonicBackbone

    register(MeissonicBackbone)
