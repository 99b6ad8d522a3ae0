"""``prompt-file``: prompts from plain-text files, one per line.

Lines that are blank or start with ``#`` are skipped; a line ``category<TAB>prompt``
carries a category (e.g. an HPSv2 style: anime, concept-art, paintings, photo) used
by per-category evaluation tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext, PromptSource


@dataclass
class PromptFileOptions:
    train: str = field(metadata={"doc": "training prompt file (relative paths: from the recipe's folder)"})
    eval: str | None = field(
        default=None, metadata={"doc": "held-out prompt file (default: the training file)"}
    )
    max_eval: int | None = field(
        default=None, metadata={"doc": "use only the first N held-out prompts", "min": 1}
    )


def read_prompts(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise UserError(
            f"{path}: prompt file not found (one prompt per line; set prompts.*.options.train/eval)"
        )
    prompts, cats = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cat, _, text = line.rpartition("\t")
        prompts.append(text.strip())
        cats.append(cat.strip() or "all")
    if not prompts:
        raise UserError(f"{path}: no prompts in the file (one prompt per line)")
    return prompts, cats


class PromptFile(PromptSource):
    """Prompts from a text file: training prompts drawn uniformly with replacement from
    the seeded generator; the held-out list in file order."""

    name = "prompt-file"
    Options = PromptFileOptions

    def __init__(self, train: Path, eval_path: Path | None, max_eval: int | None = None):
        self.train_prompts, _ = read_prompts(train)
        self.eval_prompts, cats = read_prompts(eval_path or train)
        if max_eval:
            self.eval_prompts, cats = self.eval_prompts[:max_eval], cats[:max_eval]
        self._category = dict(zip(self.eval_prompts, cats))

    @classmethod
    def from_options(cls, options: PromptFileOptions, ctx: BuildContext) -> PromptFile:
        base = Path(ctx.recipe_dir)

        def resolve(p: str | None) -> Path | None:
            if p is None:
                return None
            q = Path(p).expanduser()
            return q if q.is_absolute() or q.exists() else base / q

        return cls(resolve(options.train), resolve(options.eval), options.max_eval)

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        idx = torch.randint(0, len(self.train_prompts), (n,), generator=generator)
        return [self.train_prompts[i] for i in idx.tolist()]

    def evaluation(self) -> list[str]:
        return list(self.eval_prompts)

    def categorize(self, prompts: list[str]) -> list[str]:
        return [self._category.get(p, "all") for p in prompts]
