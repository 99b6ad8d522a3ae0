"""``mdmrl pretrain RECIPE``: masked-token pretraining for backbones that offer it.

A backbone class supports pretraining by defining a ``PretrainOptions`` dataclass and
a classmethod ``pretrain(options, output, progress) -> dict``. The recipe is::

    [pretrain]
    backbone = "shapes-mdm"
    output = "plugins/shapes/weights/shapes-mdm.safetensors"
    [pretrain.options]
    steps = 3000
"""

from __future__ import annotations

import json
import sys

from mdmrl import recipe as rc
from mdmrl.errors import UserError
from mdmrl.plugins import get_registry


def load(path: str, overrides: list[str]):
    """Read and validate a pretraining recipe: (its spec, the backbone class, the
    backbone's built ``PretrainOptions``)."""
    raw = rc.apply_overrides(rc.read_toml(path), overrides)
    if not rc.is_pretrain(raw):
        raise UserError(
            f"{path}: not a pretraining recipe (no [pretrain] table); run it with: mdmrl run {path}"
        )
    spec, options = rc.validate_pretrain(raw, source=path)
    return spec, get_registry().get("backbone", spec.backbone).cls, options


def pretrain_command(path: str, overrides: list[str]) -> dict:
    spec, cls, options = load(path, overrides)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ) as prog:
        task = prog.add_task("pretrain", total=getattr(options, "steps", None), info="")

        def progress(step: int, stats: dict) -> None:
            prog.update(task, completed=step, info=" ".join(f"{k} {v:.4f}" for k, v in stats.items()))

        result = cls.pretrain(options, spec.output, progress=progress)
    print(json.dumps(result, indent=1, default=str), file=sys.stderr)
    return result
