"""Build the parts a recipe names, through the plug-in registry."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import Backbone, BuildContext, Objective, PromptSource, Sampler, SchedulePolicy
from mdmrl.plugins import get_registry
from mdmrl.recipe import LoadedRecipe
from mdmrl.rewarding import CompositeRewarder, DeferredRewarder, build_rewarders


@dataclass
class Parts:
    backbone: Backbone
    schedule: SchedulePolicy
    sampler: Sampler
    rewarder: CompositeRewarder | DeferredRewarder  # (or what reward_placement scores with)
    objective: Objective
    train_prompts: PromptSource
    eval_prompts: PromptSource


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f'device: {name!r} was asked for but no CUDA device is available; use device = "cpu"')
    return torch.device(name)


def build_part(loaded: LoadedRecipe, path: str, kind: str, name: str, ctx: BuildContext):
    reg = get_registry().get(kind, name)
    part = reg.cls.from_options(loaded.part_options[path], ctx)
    if isinstance(part, torch.nn.Module):
        part.to(ctx.device)
    return part


def parts_seed(seed: int) -> int:
    """The seed of torch's global generator while the parts of a recipe with ``seed``
    are built (distinct from the engine's streams, mdmrl.engine.stream_seed)."""
    return (seed * 1_000_003 + 104_729) % (2**63 - 1)


def build_parts(loaded: LoadedRecipe, device: torch.device | None = None) -> Parts:
    """Construct every part of a validated recipe (weights are loaded here).

    Parts that initialise weights at random (a learned schedule's network, a backbone
    built from a config) draw from torch's global generator, which is seeded with
    :func:`parts_seed` of the recipe's seed for the duration, in a forked state: the
    same recipe builds the same parts in every process, and the caller's generator is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(parts_seed(loaded.recipe.seed))
        return _build_parts(loaded, device)


def _build_parts(loaded: LoadedRecipe, device: torch.device | None) -> Parts:
    r = loaded.recipe
    device = device or resolve_device(r.device)
    ctx = BuildContext(device=device, backbone=None, recipe_dir=loaded.directory)
    backbone = build_part(loaded, "backbone", "backbone", r.backbone.name, ctx)
    ctx.backbone = backbone
    schedule = build_part(loaded, "schedule", "schedule", r.schedule.name, ctx)
    sampler = build_part(loaded, "sampler", "sampler", r.sampler.name, ctx)
    objective = build_part(loaded, "objective", "objective", r.objective.name, ctx)
    # where reward_placement keeps the rewarders elsewhere, this process builds none
    rewarder = build_rewarders(
        r, ctx, lambda i, at: build_part(loaded, f"rewards[{i}]", "rewarder", r.rewards[i].name, at)
    )
    train_prompts = build_part(loaded, "prompts.train", "prompts", r.prompts.train.name, ctx)
    if r.prompts.eval is not None:
        eval_prompts = build_part(loaded, "prompts.eval", "prompts", r.prompts.eval.name, ctx)
    else:
        eval_prompts = train_prompts
    return Parts(backbone, schedule, sampler, rewarder, objective, train_prompts, eval_prompts)
