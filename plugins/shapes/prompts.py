"""Prompt sources of the shapes world: a training stream and a held-out list.

The two draw from disjoint parts of the grammar (see :func:`.grammar.is_heldout` and
docs/shapes-world.md). Training draws use only the torch generator they are given, so
a run that saves and restores its generator draws the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext, PromptSource
from mdmrl_plugins.shapes.grammar import FAMILIES, family_prompts, parse, sample_prompt


@dataclass
class ShapesPromptOptions:
    families: list[str] = field(
        default_factory=lambda: list(FAMILIES),
        metadata={"doc": "GenEval task families to draw from", "choices": list(FAMILIES)},
    )
    count: int = field(
        default=60,
        metadata={"doc": "length of the fixed evaluation() list (cycles through the families)", "min": 6},
    )
    seed: int = field(default=1234, metadata={"doc": "seed of the fixed evaluation() list"})


class _ShapesPrompts(PromptSource):
    split: str = ""
    Options = ShapesPromptOptions

    def __init__(self, options: ShapesPromptOptions | None = None):
        o = options or ShapesPromptOptions()
        self._validate(o)
        # keep the canonical family order whatever order the recipe lists them in
        self.families = tuple(f for f in FAMILIES if f in set(o.families))
        self.options = o

    @classmethod
    def _validate(cls, o: ShapesPromptOptions) -> None:
        where = f"prompt source {cls.name!r}"
        bad = [f for f in o.families if f not in FAMILIES]
        if bad:
            raise UserError(
                f"{where}: options.families: {bad[0]!r} is not a family; choose from: {', '.join(FAMILIES)}"
            )
        if not o.families:
            raise UserError(
                f"{where}: options.families is empty; name at least one of: {', '.join(FAMILIES)}"
            )
        if len(set(o.families)) != len(o.families):
            raise UserError(f"{where}: options.families lists a family twice: {o.families}")
        if o.count < 6:
            raise UserError(f"{where}: options.count is {o.count}; it must be at least 6")

    @classmethod
    def from_options(cls, options: ShapesPromptOptions, ctx: BuildContext) -> _ShapesPrompts:
        return cls(options)

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """n prompts of this source's split. Families come in a random order, each
        family appearing floor(n / F) or ceil(n / F) times; all randomness is drawn
        from ``generator`` (one 62-bit draw per call)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        rng = np.random.default_rng(seed)
        fams = self.families
        order: list[str] = []
        while len(order) < n:
            order.extend(fams[i] for i in rng.permutation(len(fams)))
        return [sample_prompt(rng, self.split, f) for f in order[:n]]

    def evaluation(self) -> list[str]:
        """The fixed list of ``count`` prompts of this split: families in turn
        (canonical order), each family walking through a seeded shuffle of all of its
        prompts in the split (so it repeats only after using every one)."""
        rng = np.random.default_rng(self.options.seed)
        pools = {}
        for f in self.families:
            pool = family_prompts(f, self.split)
            pools[f] = [pool[i] for i in rng.permutation(len(pool))]
        out = []
        for i in range(self.options.count):
            f = self.families[i % len(self.families)]
            pool = pools[f]
            out.append(pool[(i // len(self.families)) % len(pool)])
        return out

    def categorize(self, prompts: list[str]) -> list[str]:
        """The GenEval family of each prompt (:attr:`.grammar.Requirements.category`,
        one of the six for every grammar prompt, plain-English phrasings included);
        prompts outside the grammar raise UserError."""
        return [parse(p).category for p in prompts]


class ShapesTrainPrompts(_ShapesPrompts):
    """Training prompts of the shapes grammar (no held-out composition)."""

    name = "shapes-train"
    split = "train"


class ShapesHeldoutPrompts(_ShapesPrompts):
    """Held-out prompts of the shapes grammar: each contains a composition that no
    training prompt contains. evaluation() is the GenEval-style test list."""

    name = "shapes-heldout"
    split = "heldout"
