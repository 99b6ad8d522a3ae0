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
from dataclasses import dataclass, field

from mdmrl import options as opts
from mdmrl import recipe as rc
from mdmrl.errors import ConfigError, PluginLookupError
from mdmrl.plugins import get_registry


@dataclass
class PretrainSpec:
    backbone: str = field(metadata={"doc": "registered backbone name"})
    output: str = field(metadata={"doc": "path of the .safetensors file to write"})
    options: dict = field(default_factory=dict, metadata={"doc": "the backbone's PretrainOptions"})


@dataclass
class PretrainRecipe:
    pretrain: PretrainSpec = field(metadata={"doc": "what to pretrain and where to write it"})


def load(path: str, overrides: list[str]):
    raw = rc.apply_overrides(rc.read_toml(path), overrides)
    problems: list[str] = []
    spec = opts.build(PretrainRecipe, raw, "", problems)
    built = None
    if spec is not None:
        try:
            cls = get_registry().get("backbone", spec.pretrain.backbone).cls
        except PluginLookupError as exc:
            problems.append(f"pretrain.backbone: {exc}")
            cls = None
        if cls is not None:
            if not hasattr(cls, "PretrainOptions"):
                problems.append(f"pretrain.backbone: {spec.pretrain.backbone!r} does not support pretraining")
            else:
                built = opts.build(cls.PretrainOptions, spec.pretrain.options, "pretrain.options", problems)
    if problems:
        raise ConfigError(problems, source=path)
    return spec.pretrain, cls, built


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
