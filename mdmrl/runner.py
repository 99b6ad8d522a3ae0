"""High-level flows behind the CLI: run (new or resumed) and evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from mdmrl import checkpoint as ckpt
from mdmrl import recipe as rc
from mdmrl import rundir
from mdmrl.build import Parts, build_part, build_parts, resolve_device
from mdmrl.distributed import Dist, setup
from mdmrl.engine import Trainer
from mdmrl.errors import UserError
from mdmrl.evaluate import evaluate, format_table
from mdmrl.interfaces import BuildContext
from mdmrl.trajectory import ACTION_FIELDS


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def eval_prompts(parts: Parts, max_prompts: int | None) -> tuple[list[str], list[str]]:
    prompts = parts.eval_prompts.evaluation()
    if max_prompts:
        prompts = prompts[:max_prompts]
    return prompts, parts.eval_prompts.categorize(prompts)


def run_eval(parts: Parts, loaded: rc.LoadedRecipe, label: str, out_dir: Path, steps: list[int]) -> dict:
    """Evaluate at each step count, write eval/<label>@<T>.json and an image grid."""
    from mdmrl.images import save_grid

    e = loaded.recipe.eval
    prompts, cats = eval_prompts(parts, e.max_prompts)
    results = {}
    for t in steps:
        _log(f"mdmrl: evaluating {label} on {len(prompts)} prompts x {e.seeds} seeds at {t} steps")
        res = evaluate(
            parts.backbone,
            parts.schedule,
            parts.sampler,
            parts.rewarder,
            prompts,
            cats,
            t,
            e.seeds,
            deterministic=e.deterministic_schedule,
            batch_size=loaded.recipe.train.rollout_batch,
            keep_images=16,
        )
        imgs = res.pop("images")
        if imgs is not None:
            with torch.no_grad():
                save_grid(
                    parts.backbone.decode(imgs.to(next(iter(parts.backbone.parameters())).device))
                    .float()
                    .cpu(),
                    prompts[:16],
                    out_dir / f"{label}@{t}.png",
                )
        res["actions"] = schedule_actions(parts, t)
        tmp = out_dir / f".{label}@{t}.json.tmp"  # whole or absent, even if the run is killed here
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out_dir / f"{label}@{t}.json")
        results[t] = res
    return results


@torch.no_grad()
def schedule_actions(parts: Parts, steps: int) -> dict[str, list[float]]:
    """The schedule's mean action per step on 8 evaluation prompts (for plots)."""
    prompts = parts.eval_prompts.evaluation()[:8]
    seeds = torch.arange(len(prompts), dtype=torch.long) + 99
    parts.backbone.eval()
    parts.schedule.eval()
    traj = parts.sampler.sample(
        parts.backbone, parts.schedule, prompts, steps, seeds, deterministic_schedule=True
    )
    acts = traj.actions.float().mean(0)
    return {name: acts[:, i].tolist() for i, name in enumerate(ACTION_FIELDS)}


def summary(before: dict, after: dict, reference: dict | None = None, reference_name: str = "") -> str:
    """The held-out tables (base, reference when given, trained) and overall gains."""
    reference = reference or {}
    lines = []
    for t in after:
        lines.append(f"\n### Held-out evaluation at {t} steps\n")
        cols = {"base": before.get(t), "reference": reference.get(t), "trained": after[t]}
        lines.append(format_table({k: v for k, v in cols.items() if v is not None}))
        a = after[t]["metrics"]["total"]["overall"]["mean"]
        if t in before:
            b = before[t]["metrics"]["total"]["overall"]["mean"]
            lines.append(f"\nOverall total reward: base {b:.4f} -> trained {a:.4f} (gain {a - b:+.4f})")
        if t in reference:
            r = reference[t]["metrics"]["total"]["overall"]["mean"]
            lines.append(
                f"Overall total reward: base under the reference schedule ({reference_name}) "
                f"{r:.4f} -> trained {a:.4f} (gain {a - r:+.4f})"
            )
    return "\n".join(lines) + "\n"


def run_reference_eval(
    parts: Parts, loaded: rc.LoadedRecipe, eval_dir: Path, device: torch.device, steps: list[int]
) -> None:
    """Evaluate the base model under the recipe's fixed ``eval.reference`` schedule."""
    spec = loaded.recipe.eval.reference
    ctx = BuildContext(device=device, backbone=parts.backbone, recipe_dir=loaded.directory)
    ref = build_part(loaded, "eval.reference", "schedule", spec.name, ctx)
    run_eval(dataclasses.replace(parts, schedule=ref), loaded, "reference", eval_dir, steps)


def load_eval(out_dir: Path, label: str) -> dict:
    found = {}
    for p in sorted(out_dir.glob(f"{label}@*.json")):
        found[int(p.stem.split("@")[1])] = json.loads(p.read_text())
    return found


def missing_steps(out_dir: Path, label: str, steps: list[int]) -> list[int]:
    """The step counts of ``steps`` without a finished ``<label>@<T>.json`` (a run
    stopped during an evaluation redoes only what it had not written)."""
    done = load_eval(out_dir, label)
    return [t for t in steps if t not in done]


def run(
    recipe_path: str | None,
    run_dir: str | None,
    overrides: list[str],
    resume: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Start (or resume) a run; returns the run directory."""
    fresh = not resume  # a new run, or a resumed one that never reached a checkpoint
    if resume:
        rd = Path(resume)
        if not (rd / "recipe.toml").is_file():
            raise UserError(f"{rd}: not a run directory (no recipe.toml); nothing to resume")
        if overrides:
            raise UserError("--set cannot be combined with --resume: a resumed run keeps its recipe")
        loaded = rc.load(rd / "recipe.toml", run_dir=True)
        found = ckpt.list_checkpoints(rd / "checkpoints")
        fresh = not found
    else:
        if recipe_path is None:
            raise UserError("run: a RECIPE or --resume RUN_DIR is required")
        loaded = rc.load(recipe_path, overrides)
        rd = Path(run_dir) if run_dir else rundir.default_run_dir(recipe_path)
    device = resolve_device(loaded.recipe.device)
    dist = setup(loaded.recipe.train.mixed_precision, device)
    if not resume and dist.is_main:
        rundir.prepare(rd, overwrite)
    if device.type == "cuda" and dist.active:
        device = torch.device("cuda", dist.local_rank)
    parts = build_parts(loaded, device)  # weights load here: fails before the run dir exists
    trainer = Trainer(loaded, parts, rd, device, dist, log=_log)
    if dist.is_main:
        _log(f"mdmrl: plan: {rc.plan_summary(loaded.recipe.train)}")
        if dist.active:
            _log(
                f"mdmrl: {dist.world_size} processes; accelerate {dist.engine} wraps the trained "
                f"modules in {type(trainer.train_step).__name__}"
            )
    if not fresh:
        trainer.restore(found[-1])
        _log(f"mdmrl: resuming {rd} after iteration {trainer.iteration} of {len(trainer.plan)}")
    elif resume:
        _log(f"mdmrl: {rd} has no checkpoint yet; starting it again from iteration 0 with its saved recipe")
        if dist.is_main:  # TensorBoard events of the stopped attempt would repeat
            shutil.rmtree(rd / "tb", ignore_errors=True)  # (metrics.jsonl is truncated by the trainer)
    elif dist.is_main:
        rundir.create(rd, overwrite)
        (rd / "recipe.toml").write_text(
            f"# Resolved recipe of this run (source: {loaded.source}).\n"
            f"# Resume: mdmrl run --resume {rd}\n" + rc.dump_toml(rc.resolved_dict(loaded, effective=True))
        )
        (rd / "environment.json").write_text(json.dumps(rundir.environment(), indent=2))
    dist.barrier()
    e = loaded.recipe.eval
    eval_dir = rd / "eval"
    with trainer.full_parameters():  # the main process evaluates with the whole model
        if dist.is_main and e.before:
            run_eval(parts, loaded, "base", eval_dir, missing_steps(eval_dir, "base", e.steps))
        if dist.is_main and e.before and e.reference is not None:
            steps = missing_steps(eval_dir, "reference", e.steps)
            if steps:
                run_reference_eval(parts, loaded, eval_dir, device, steps)
        dist.barrier()
    status = _train_with_progress(trainer, progress and dist.is_main)
    if status == "done" and e.after:
        with trainer.full_parameters():
            if dist.is_main:
                after = run_eval(parts, loaded, "trained", eval_dir, e.steps)
                ref_name = e.reference.name if e.reference is not None else ""
                text = summary(load_eval(eval_dir, "base"), after, load_eval(eval_dir, "reference"), ref_name)
                (eval_dir / "summary.md").write_text(text)
                print(text)
            dist.barrier()
    if dist.is_main and status == "done":
        from mdmrl.report import report

        report(rd)
        _log(f"mdmrl: run finished: {rd}")
    elif dist.is_main:
        _log(f"mdmrl: run stopped ({status}); resume with: mdmrl run --resume {rd}")
    if status == "interrupted":
        raise SystemExit(130)
    if status == "diverged":
        raise SystemExit(3)
    return rd


def _train_with_progress(trainer: Trainer, show: bool) -> str:
    if not show:
        return trainer.train()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*cols, transient=False) as prog:
        task = prog.add_task("train", total=len(trainer.plan), completed=trainer.iteration, info="")

        def cb(i: int, n: int, row: dict) -> None:
            info = f"{row['phase']} reward {row['reward_mean']:.3f}"
            prog.update(task, completed=i, info=info)

        return trainer.train(progress=cb)


def load_for_eval(
    recipe_path: str | None, checkpoint: str | None, overrides: list[str]
) -> tuple[rc.LoadedRecipe, Parts]:
    """Build the parts of a recipe (or of a run directory's recipe) and load a checkpoint."""
    ck = Path(checkpoint) if checkpoint else None
    if ck is not None and not ck.exists():
        raise UserError(f"{ck}: checkpoint not found")
    if ck is not None and (ck / "checkpoints").is_dir():  # a run directory: take its latest checkpoint
        found = ckpt.list_checkpoints(ck / "checkpoints")
        if not found:
            raise UserError(f"{ck}/checkpoints: no complete checkpoint")
        ck, run_dir = found[-1], ck
    elif ck is not None:
        run_dir = ck.parent.parent
    from_run = recipe_path is None and ck is not None  # the run directory's resolved recipe
    if from_run:
        recipe_path = str(run_dir / "recipe.toml")
    if recipe_path is None:
        raise UserError("a RECIPE (or --checkpoint inside a run directory) is required")
    loaded = rc.load(recipe_path, overrides, run_dir=from_run)
    parts = build_parts(loaded, resolve_device(loaded.recipe.device))
    if ck is not None:
        ckpt.load(ck, parts.backbone, parts.schedule)
    return loaded, parts


def _eval_prompts_from(
    path: str, parts: Parts
) -> tuple[list[str], list[str], list[dict] | None, list[str] | None]:
    """Prompts (and categories, GenEval metadata, DPG ids) from a plain-text file, a
    GenEval metadata .jsonl, or a DPG-Bench folder of <id>.txt files."""
    from mdmrl.evaluate import read_prompt_file
    from mdmrl.export import read_dpg_folder, read_geneval_metadata

    p = Path(path)
    if p.is_dir():
        prompts, ids = read_dpg_folder(p)
        return prompts, ["all"] * len(prompts), None, ids
    if p.suffix == ".jsonl" and p.is_file():
        prompts, meta = read_geneval_metadata(p)
        return prompts, [str(m.get("tag", "all")) for m in meta], meta, None
    prompts, cats = read_prompt_file(path, parts.eval_prompts.categorize)
    return prompts, cats, None, None


def eval_command(
    recipe_path, prompts_file, checkpoint, steps, seeds, overrides, out, write_images=None, layout="plain"
) -> str:
    loaded, parts = load_for_eval(recipe_path, checkpoint, overrides)
    meta = ids = None
    if prompts_file:
        prompts, cats, meta, ids = _eval_prompts_from(prompts_file, parts)
    else:
        prompts, cats = eval_prompts(parts, loaded.recipe.eval.max_prompts)
    steps = steps or loaded.recipe.eval.steps
    seeds = seeds or loaded.recipe.eval.seeds
    label = "checkpoint" if checkpoint else "base"
    blocks, dump = [], {}
    for t in steps:
        sink = None
        if write_images:
            from mdmrl.export import ImageWriter

            target = Path(write_images) / f"steps{t}" if len(steps) > 1 else Path(write_images)
            sink = ImageWriter(target, layout, prompts, seeds, metadata=meta, ids=ids)
        res = evaluate(
            parts.backbone,
            parts.schedule,
            parts.sampler,
            parts.rewarder,
            prompts,
            cats,
            t,
            seeds,
            deterministic=loaded.recipe.eval.deterministic_schedule,
            batch_size=loaded.recipe.train.rollout_batch,
            image_sink=sink,
        )
        res.pop("images")
        dump[t] = res
        blocks.append(
            f"### {label} at {t} steps ({len(prompts)} prompts x {seeds} seeds; mean ± std over seeds)\n"
        )
        blocks.append(format_table({label: res}))
    if out:
        Path(out).write_text(json.dumps(dump, indent=1))
    return "\n".join(blocks)


def sample_command(recipe_path, checkpoint, prompts, prompts_file, steps, seed, out, overrides) -> Path:
    from mdmrl.evaluate import read_prompt_file
    from mdmrl.images import save_grid

    loaded, parts = load_for_eval(recipe_path, checkpoint, overrides)
    if prompts_file:
        prompts = read_prompt_file(prompts_file)[0]
    if not prompts:
        raise UserError("sample: give --prompt TEXT (repeatable) or --prompts FILE")
    steps = steps or loaded.recipe.sampler.steps
    seeds = torch.arange(len(prompts), dtype=torch.long) + seed
    parts.backbone.eval()
    parts.schedule.eval()
    with torch.no_grad():
        traj = parts.sampler.sample(
            parts.backbone, parts.schedule, prompts, steps, seeds, deterministic_schedule=True
        )
        imgs = parts.backbone.decode(traj.final_tokens).float().cpu()
    path = sample_output_path(out)
    save_grid(imgs, prompts, path)
    return path


def sample_output_path(out) -> Path:
    """``mdmrl sample --out``: a ``.png`` file, or a folder (existing or not, no
    suffix) that receives ``samples.png``. Other suffixes are a UserError."""
    path = Path(out)
    if path.suffix.lower() == ".png":
        return path
    if path.suffix and not path.is_dir():
        raise UserError(f"sample: --out {out}: give a .png file or a folder, not a {path.suffix} file")
    return path / "samples.png"


__all__ = ["run", "eval_command", "sample_command", "Dist"]
