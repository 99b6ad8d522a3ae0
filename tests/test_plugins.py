import importlib.metadata as md
import re
from pathlib import Path

import pytest

from mdmrl import hookspecs, plugins
from mdmrl.errors import PluginLookupError
from mdmrl.hookspecs import hookimpl
from mdmrl.interfaces import Rewarder
from mdmrl.plugins import Registry

ROOT = Path(__file__).resolve().parents[1]


class _Reward(Rewarder):
    name = "constant-one"

    def __init__(self, options=None):
        pass

    def score(self, batch):
        import torch

        return torch.ones(len(batch.prompts))


class _GoodPlugin:
    @hookimpl
    def register_rewarders(self, register):
        register(_Reward)


GOOD = _GoodPlugin()


def _fake_entry_points(monkeypatch, eps):
    monkeypatch.setattr(plugins.md, "entry_points", lambda group: [e for e in eps if e.group == group])


def test_first_party_plugins_are_discovered_through_entry_points():
    eps = {e.name: e.value for e in md.entry_points(group="mdmrl")}
    for family in ("shapes", "cogrpo", "maskgrpo", "meissonic", "amused", "rewards", "prompts"):
        assert eps[family] == f"mdmrl_plugins.{family}.plugin"


def test_core_never_imports_a_concrete_plugin():
    for path in (ROOT / "mdmrl").glob("*.py"):
        text = path.read_text()
        assert "mdmrl_plugins" not in text, f"{path.name} imports a first-party plug-in by name"


def test_broken_plugin_is_reported_and_others_still_load(monkeypatch, capsys):
    eps = [
        md.EntryPoint(name="broken", value="mdmrl_no_such_module_xyz", group="mdmrl"),
        md.EntryPoint(name="good", value="tests.test_plugins:GOOD", group="mdmrl"),
    ]
    _fake_entry_points(monkeypatch, eps)
    reg = Registry()
    reg.load_entry_points()
    assert any(e.startswith('Error importing plugin "broken": ModuleNotFoundError') for e in reg.errors)
    assert 'Error importing plugin "broken"' in capsys.readouterr().err
    assert reg.get("rewarder", "constant-one").plugin == "good"


def test_loading_is_idempotent(monkeypatch):
    eps = [md.EntryPoint(name="good", value="tests.test_plugins:GOOD", group="mdmrl")]
    _fake_entry_points(monkeypatch, eps)
    reg = Registry()
    reg.load_entry_points()
    reg.load_entry_points()
    assert reg.names("rewarder") == ["constant-one"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MDMRL_LOAD_PLUGINS": "good"}, ["constant-one"]),
        ({"MDMRL_LOAD_PLUGINS": ""}, []),
        ({"MDMRL_DISABLE_PLUGINS": "good"}, []),
        ({"MDMRL_DISABLE_PLUGINS": "other, x"}, ["constant-one"]),
    ],
)
def test_allow_and_block_lists(monkeypatch, env, expected):
    eps = [md.EntryPoint(name="good", value="tests.test_plugins:GOOD", group="mdmrl")]
    _fake_entry_points(monkeypatch, eps)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reg = Registry()
    reg.load_entry_points()
    assert reg.names("rewarder") == expected


def test_unknown_name_lists_the_available_ones():
    reg = Registry()
    reg.register_plugin(_GoodPlugin(), "good")
    with pytest.raises(
        PluginLookupError, match=r"Unknown rewarder 'constnt-one'\. Available: constant-one\."
    ):
        reg.get("rewarder", "constnt-one")


def test_duplicate_and_malformed_registrations_are_reported(capsys):
    class Dup:
        @hookimpl
        def register_rewarders(self, register):
            register(_Reward)

    class Wrong:
        @hookimpl
        def register_samplers(self, register):
            register(_Reward)  # a Rewarder registered as a sampler

    reg = Registry()
    reg.register_plugin(_GoodPlugin(), "good")
    reg.register_plugin(Dup(), "dup")
    reg.register_plugin(Wrong(), "wrong")
    assert reg.names("rewarder") == ["constant-one"]
    assert reg.names("sampler") == []
    errors = "\n".join(reg.errors)
    assert "already registered by plugin" in errors
    assert "is not a subclass of Sampler" in errors


HOOKS = [name for name in dir(hookspecs) if name.startswith("register_")]


def test_every_hook_maps_to_a_kind():
    assert sorted(HOOKS) == sorted(hookspecs.HOOK_KINDS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    doc = (ROOT / "docs" / "plugin-hooks.md").read_text()
    assert re.search(rf"^## `{hook}\(register\)`", doc, re.M), (
        f"docs/plugin-hooks.md lacks a section for {hook}"
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    tests = (ROOT / "tests" / "test_hooks.py").read_text()
    assert f"def test_hook_{hook}(" in tests, f"tests/test_hooks.py has no test for the hook {hook}"
