"""The hooks a plug-in may implement.

A plug-in is a module (or object) exposed through the ``mdmrl`` entry-point group.
Each hook receives a ``register`` callable; the plug-in calls ``register(cls)`` once
per implementation it provides, where ``cls`` subclasses the matching base class in
:mod:`mdmrl.interfaces` and sets a unique ``name``. The core owns the registry and
reports duplicate or malformed registrations. Hooks are called once, the first time
the registry is needed (loading is lazy).
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("mdmrl")
hookimpl = pluggy.HookimplMarker("mdmrl")

Register = Callable[[type], None]


@hookspec
def register_backbones(register: Register) -> None:
    """Register :class:`~mdmrl.interfaces.Backbone` classes: ``register(MyBackbone)``.

    Called when a recipe names a backbone or ``mdmrl plugins`` lists them.
    Returns nothing.
    """


@hookspec
def register_schedules(register: Register) -> None:
    """Register :class:`~mdmrl.interfaces.SchedulePolicy` classes (fixed schedules and
    learned schedule policies). Returns nothing."""


@hookspec
def register_samplers(register: Register) -> None:
    """Register :class:`~mdmrl.interfaces.Sampler` classes. Returns nothing."""


@hookspec
def register_rewarders(register: Register) -> None:
    """Register :class:`~mdmrl.interfaces.Rewarder` classes. A recipe combines one or
    more of them with weights. Returns nothing."""


@hookspec
def register_objectives(register: Register) -> None:
    """Register :class:`~mdmrl.interfaces.Objective` classes. Returns nothing."""


@hookspec
def register_prompt_sources(register: Register) -> None:
    """Register :class:`~mdmrl.interfaces.PromptSource` classes (training prompt
    streams and held-out evaluation lists). Returns nothing."""


#: hook name -> part kind it registers (see :data:`mdmrl.interfaces.KINDS`).
HOOK_KINDS: dict[str, str] = {
    "register_backbones": "backbone",
    "register_schedules": "schedule",
    "register_samplers": "sampler",
    "register_rewarders": "rewarder",
    "register_objectives": "objective",
    "register_prompt_sources": "prompts",
}
