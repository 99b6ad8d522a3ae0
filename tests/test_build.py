"""build_parts: the same recipe builds the same randomly initialised parts in every
process, whatever torch's global generator held before."""

from __future__ import annotations

from pathlib import Path

import torch

from mdmrl.build import build_parts
from mdmrl.recipe import load

REPO = Path(__file__).resolve().parent.parent


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parts_do_not_depend_on_the_global_generator(toy_registry, toy_recipe):
    loaded = load(toy_recipe)
    torch.manual_seed(1)
    first = build_parts(loaded)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = build_parts(loaded)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    assert _equal(_state(first.backbone), _state(second.backbone))
    assert _equal(_state(first.schedule), _state(second.schedule))


def test_quickstart_schedule_network_is_reproducible():
    """The learned Gaussian schedule of the quickstart: its network (all but the
    zero-initialised last layer) was drawn from an unseeded generator before, so two
    runs of the same recipe trained different schedules."""
    loaded = load(REPO / "recipes" / "shapes" / "co_grpo.toml")
    torch.manual_seed(11)
    a = _state(build_parts(loaded, torch.device("cpu")).schedule)
    torch.manual_seed(12)
    b = _state(build_parts(loaded, torch.device("cpu")).schedule)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "depthwise" in k)
    assert _equal(a, b)


def test_the_recipe_seed_sets_the_schedule_network(tmp_path):
    text = (REPO / "recipes" / "shapes" / "co_grpo.toml").read_text()
    assert "\nseed = 0\n" in text
    other = tmp_path / "co_grpo_seed1.toml"
    other.write_text(text.replace("\nseed = 0\n", "\nseed = 1\n", 1))
    a = _state(build_parts(load(REPO / "recipes" / "shapes" / "co_grpo.toml"), torch.device("cpu")).schedule)
    b = _state(build_parts(load(other), torch.device("cpu")).schedule)
    assert not _equal(a, b)
