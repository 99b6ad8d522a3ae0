"""Plug-in discovery: the pluggy manager, entry points, and the registry of parts.

Plug-ins (first-party ones included) are modules exposed in the ``mdmrl`` entry-point
group. They are imported the first time :func:`get_registry` is called, once per
process. Two environment variables steer loading:

- ``MDMRL_LOAD_PLUGINS``: comma-separated entry-point names; when set, only these load
  (an empty value loads none).
- ``MDMRL_DISABLE_PLUGINS``: comma-separated entry-point names that never load.

A plug-in that fails to import is reported as ``Error importing plugin "<name>"``
with its cause, and the other plug-ins still load.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from dataclasses import dataclass

import pluggy

from mdmrl import hookspecs
from mdmrl.errors import PluginLookupError
from mdmrl.interfaces import KINDS

ENTRY_POINT_GROUP = "mdmrl"


@dataclass(frozen=True)
class Registration:
    """One registered implementation."""

    kind: str
    name: str
    cls: type
    plugin: str  # entry-point name (or the name given to register_plugin)
    distribution: str
    version: str


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    error: str | None = None


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {x.strip() for x in raw.split(",") if x.strip()}


class Registry:
    """Every registered part, by kind and name, and where each came from."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("mdmrl")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.errors: list[str] = []
        self._parts: dict[str, dict[str, Registration]] | None = None

    # -- loading -------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Import every allowed entry point of the ``mdmrl`` group (idempotent)."""
        allow = _env_list("MDMRL_LOAD_PLUGINS")
        block = _env_list("MDMRL_DISABLE_PLUGINS") or set()
        seen: set[str] = set()
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in seen or ep.name in self.plugins:
                continue
            seen.add(ep.name)
            if (allow is not None and ep.name not in allow) or ep.name in block:
                continue
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure is reported, not fatal
                msg = f'Error importing plugin "{ep.name}": {type(exc).__name__}: {exc}'
                self.errors.append(msg)
                self.plugins[ep.name] = PluginInfo(ep.name, dist, version, error=msg)
                print(f"mdmrl: warning: {msg}", file=sys.stderr)
                continue
            self.register_plugin(module, ep.name, dist, version)

    def register_plugin(self, plugin: object, name: str, distribution: str = "?", version: str = "?") -> None:
        """Register a plug-in object directly (tests, notebooks)."""
        if name in self.plugins and self.plugins[name].error is None:
            return
        self.pm.register(plugin, name=name)
        self.plugins[name] = PluginInfo(name, distribution, version)
        self._parts = None

    # -- the parts -----------------------------------------------------------------
    @property
    def parts(self) -> dict[str, dict[str, Registration]]:
        if self._parts is None:
            self._parts = self._collect()
        return self._parts

    def _collect(self) -> dict[str, dict[str, Registration]]:
        parts: dict[str, dict[str, Registration]] = {k: {} for k in KINDS}
        for hook_name, kind in hookspecs.HOOK_KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                info = self.plugins.get(impl.plugin_name, PluginInfo(impl.plugin_name, "?", "?"))

                def register(cls: type, _kind: str = kind, _info: PluginInfo = info) -> None:
                    self._add(parts, _kind, cls, _info)

                try:
                    impl.function(register=register)
                except Exception as exc:  # noqa: BLE001
                    msg = f'Error in plugin "{info.name}" hook {hook_name}: {type(exc).__name__}: {exc}'
                    self.errors.append(msg)
                    print(f"mdmrl: warning: {msg}", file=sys.stderr)
        return parts

    def _add(self, parts: dict, kind: str, cls: type, info: PluginInfo) -> None:
        base = KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{cls!r} is not a subclass of {base.__name__}")
        name = getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__name__} has no 'name'")
        if name in parts[kind]:
            prev = parts[kind][name]
            raise TypeError(f"{kind} {name!r} is already registered by plugin {prev.plugin!r}")
        parts[kind][name] = Registration(kind, name, cls, info.name, info.distribution, info.version)

    def names(self, kind: str) -> list[str]:
        return sorted(self.parts[kind])

    def get(self, kind: str, name: str) -> Registration:
        """The registration of ``name``; a :class:`PluginLookupError` listing the
        available names of that kind when there is none."""
        found = self.parts[kind].get(name)
        if found is None:
            available = ", ".join(self.names(kind)) or "(none installed)"
            raise PluginLookupError(f"Unknown {kind} {name!r}. Available: {available}.")
        return found


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        reg = Registry()
        reg.load_entry_points()
        _REGISTRY = reg
    return _REGISTRY


def reset_registry() -> None:
    """Forget the loaded registry (tests that change the environment variables)."""
    global _REGISTRY
    _REGISTRY = None
