"""Registration of the LLaDA backbone (heavy imports stay inside the hook)."""

from mdmrl.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    from mdmrl_plugins.llada.backbone import LLaDABackbone

    register(LLaDABackbone)
