"""Held-out evaluation: per-category and overall reward means, spread over seeds."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import Backbone, GeneratedBatch, Sampler, SchedulePolicy
from mdmrl.rewarding import CompositeRewarder, concat_results

#: Evaluation noise does not depend on the run's seed, so that the model before and
#: after training (and two different runs) are compared on the same draws.
EVAL_SEED_BASE = 7_000_003


def eval_seed(seed_index: int, prompt_index: int) -> int:
    return EVAL_SEED_BASE * (seed_index + 1) + prompt_index


def read_prompt_file(path: str, categorize=None) -> tuple[list[str], list[str] | None]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. A line
    ``category<TAB>prompt`` carries its category (e.g. an HPSv2 style).

    ``categorize`` (a prompt source's :meth:`~mdmrl.interfaces.PromptSource.categorize`)
    checks every prompt and gives the category of each line that has none (then the
    categories are always returned); a prompt it rejects with a UserError is reported
    with the file and line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: prompt file not found")
    prompts, cats, lines = [], [], []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" in line:
            cat, text = line.split("\t", 1)
            cats.append(cat.strip())
            prompts.append(text.strip())
        else:
            cats.append("")
            prompts.append(line.strip())
        lines.append(number)
    if not prompts:
        raise UserError(f"{path}: no prompts (one per line)")
    if categorize is not None:
        for i, number in enumerate(lines):
            try:
                inferred = categorize([prompts[i]])[0]
            except UserError as e:
                raise UserError(f"{path}, line {number}: {e}") from None
            cats[i] = cats[i] or inferred
        return prompts, cats
    return prompts, (cats if any(cats) else None)


@torch.no_grad()
def evaluate(
    backbone: Backbone,
    schedule: SchedulePolicy,
    sampler: Sampler,
    rewarder: CompositeRewarder,
    prompts: list[str],
    categories: list[str],
    steps: int,
    seeds: int,
    deterministic: bool = True,
    batch_size: int = 64,
    keep_images: int = 0,
    image_sink=None,
) -> dict:
    """Sample every prompt ``seeds`` times at ``steps`` steps and score it.

    Returns {"steps", "prompts", "seeds", "metrics": {metric: {category: {"mean",
    "std", "per_seed"}}}, "images": first ``keep_images`` finished token grids}.
    ``std`` is the standard deviation over seeds of the per-seed mean.
    ``image_sink(prompt_index, seed_index, image [3, H, W])``, when given, receives
    every decoded image (for writing benchmark folder layouts).
    """
    was_training = backbone.training, schedule.training
    backbone.eval()
    schedule.eval()
    jobs = [(s, i) for s in range(seeds) for i in range(len(prompts))]
    results, kept = [], []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        ps = [prompts[i] for _, i in chunk]
        sd = torch.tensor([eval_seed(s, i) for s, i in chunk], dtype=torch.long)
        traj = sampler.sample(backbone, schedule, ps, steps, sd, deterministic_schedule=deterministic)
        tokens = traj.final_tokens
        if len(kept) < keep_images:
            kept.append(tokens[: keep_images - len(kept)].cpu())
        batch = GeneratedBatch(ps, tokens, backbone.grid_shape, backbone.decode)
        results.append(rewarder(batch))
        if image_sink is not None:
            images = batch.images.float().cpu()
            for k, (s, i) in enumerate(chunk):
                image_sink(i, s, images[k])
    backbone.train(was_training[0])
    schedule.train(was_training[1])
    res = concat_results(results)
    seed_idx = torch.tensor([s for s, _ in jobs])
    cats = [categories[i] for _, i in jobs]
    names = sorted(set(categories))
    metrics: dict[str, dict] = {}
    for metric, values in [("total", res.total), *res.components.items()]:
        table = {}
        for cat in [*names, "overall"]:
            sel = torch.tensor([cat == "overall" or c == cat for c in cats])
            per_seed = [float(values[sel & (seed_idx == s)].mean()) for s in range(seeds)]
            mean = sum(per_seed) / seeds
            std = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / (seeds - 1)) if seeds > 1 else 0.0
            table[cat] = {"mean": mean, "std": std, "per_seed": per_seed}
        metrics[metric] = table
    return {
        "steps": steps,
        "prompts": len(prompts),
        "seeds": seeds,
        "metrics": metrics,
        "images": torch.cat(kept) if kept else None,
    }


def format_table(results: dict[str, dict], metric_order: list[str] | None = None) -> str:
    """Markdown table: rows = categories, one column per (label, metric), mean ± std.

    ``results`` maps a label (e.g. "base @16", "trained @16") to :func:`evaluate`'s output."""
    labels = list(results)
    first = results[labels[0]]["metrics"]
    metrics = metric_order or list(first)
    cats = list(first["total"])
    head = ["category"] + [f"{lab} {m}" for lab in labels for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cat in cats:
        cells = [cat]
        for lab in labels:
            for m in metrics:
                e = results[lab]["metrics"][m][cat]
                cells.append(f"{e['mean']:.3f} ± {e['std']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
