"""MaskGRPO's text ablation (random vs AR-like fading re-mask; truncation gamma 0, 0.6,
0.8) and MaskGRPO vs Naive GRPO vs Co-GRPO with a learned schedule, at an equal CPU-time
training budget per run, on the embedded text world (worked arithmetic, docs/text.md).

    python benchmarks/text_ablate.py [--seeds 3] [--minutes M] [--set key=value ...] [--json PATH] [--reverse]

Every row is one of the text recipes under ``recipes/text/`` plus overrides:
``mask_grpo.toml`` with the re-mask function and gamma set explicitly (four rows),
``naive_grpo.toml`` (the model trained by GRPO on the block sampler's own step
log-probs, fixed schedule) and ``co_grpo.toml`` (the model and a Gaussian schedule
policy over the sampling temperature and the tokens revealed per step, alternating).
The three recipes must share backbone, sampler, rewards, prompts, model optimizer and
evaluation (and Co-GRPO's untrained schedule must be MaskGRPO's fixed one); the script
stops with one line when they do not. ``--set`` overrides apply to every row and to the
base model (e.g. another checkpoint: ``--set backbone.options.path=...``).

A run trains until ``--minutes`` of this process's CPU time went into its iterations
(one torch thread: the same work whatever else shares the machine; the iteration in
progress is finished), then is evaluated on the recipe's held-out problems (150 x 3
samples at the recipe's step count). Runs are ordered seed by seed. Finished runs are
cached under ``benchmarks/out/text_ablate/<budget>/`` so an interrupted invocation
resumes; ``--partial`` prints the tables from the cache without computing anything, and
a second invocation with ``--reverse`` and the same ``--out`` trains the runs last to
first, so that two one-thread processes share the sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import (  # noqa: E402
    OUT,
    ROOT,
    Budget,
    Runner,
    RunSpec,
    add_sweep_arguments,
    difference,
    directions_summary,
    directions_table,
    eval_se,
    fmt,
    mean_se,
    run_and_report,
    setup_threads,
    sweep_order,
    table,
)

TEXT_RECIPES = ROOT / "recipes" / "text"
ACC, FORMAT = "arith-correct", "arith-format"

#: CPU minutes of training per run of the decisive budget: 6 rows x 3 seeds are 108 CPU
#: minutes of training, plus 19 held-out evaluations of about 50 s each (the base model's: 53 s). With
#: the committed arith-llada, one MaskGRPO iteration of recipes/text/mask_grpo.toml takes
#: about 3.5 s of CPU time and one Naive GRPO or Co-GRPO model iteration about 4.5 s, so
#: 6 minutes are about 100 MaskGRPO iterations (the recipe runs 150) and about 80 of the
#: others.
MINUTES = 6.0

#: CPU minutes per run of ``--smoke``: a few iterations of 4 completions.
SMOKE_MINUTES = 0.005

#: (key, label, recipe, overrides). MaskGRPO's rows set the re-mask function and gamma
#: explicitly, so that a row keeps its meaning when the recipe's defaults change.
ROWS: list[tuple[str, str, str, list[str]]] = [
    ("naive", "Naive GRPO", "naive_grpo", []),
    (
        "random-0.6",
        "MaskGRPO, random re-mask, γ = 0.6",
        "mask_grpo",
        ['objective.options.remask="random"', "objective.options.gamma=0.6"],
    ),
    (
        "ar-0",
        "MaskGRPO, AR-fading re-mask, γ = 0",
        "mask_grpo",
        ['objective.options.remask="ar-fading"', "objective.options.gamma=0.0"],
    ),
    (
        "ar-0.6",
        "MaskGRPO, AR-fading re-mask, γ = 0.6",
        "mask_grpo",
        ['objective.options.remask="ar-fading"', "objective.options.gamma=0.6"],
    ),
    (
        "ar-0.8",
        "MaskGRPO, AR-fading re-mask, γ = 0.8",
        "mask_grpo",
        ['objective.options.remask="ar-fading"', "objective.options.gamma=0.8"],
    ),
    ("co-grpo", "Co-GRPO, learned schedule", "co_grpo", []),
]

LABELS = {k: lab for k, lab, _, _ in ROWS}

#: The paper's GSM8K-256 figures (LLaDA-8B-Instruct, MaskGRPO Table "ablation" and main
#: table), beside the row they correspond to most closely. The paper's random and AR-like
#: rows come before its "+ truncation etc." step; here re-mask is compared at gamma 0.6.
PAPER = {
    "base": "76.7 (LLaDA-8B-Instruct)",
    "naive": "79.8 (diffu-GRPO)",
    "random-0.6": "80.4 (+ managed randomness, before truncation)",
    "ar-0": "83.5 (+ AR-like re-mask, before truncation)",
    "ar-0.6": "84.7 (+ truncation etc.; MaskGRPO)",
    "ar-0.8": "— (over-truncation harms; no text figure)",
}

#: Sections of recipes/text/mask_grpo.toml that the other two recipes must equal.
SHARED = ("backbone", "sampler", "rewards", "prompts", "eval", "train.model", "train.rollout_batch")


# --------------------------------------------------------------------------- budgets


def recipe_raw(name: str, sets: list[str]) -> dict:
    """A text recipe's TOML with the user's ``--set`` overrides applied."""
    from mdmrl import recipe as rc

    return rc.apply_overrides(rc.read_toml(TEXT_RECIPES / f"{name}.toml"), sets)


def budget_for(recipe, minutes: float, smoke: bool) -> Budget:
    """The budget of every run: batch, group, steps and held-out evaluation are those of
    MaskGRPO's validated recipe (``recipe``: a :class:`mdmrl.recipe.Recipe`), so the rows
    are sized as ``mdmrl run`` sizes them. ``smoke``: 4 completions in groups of 2, one
    step per block, 6 problems x 1 sample."""
    if smoke:
        blocks = recipe.backbone.options["gen_length"] // recipe.sampler.options["block_length"]
        return Budget(
            name="smoke",
            batch=4,
            group=2,
            train_steps=max(1, blocks),
            eval_prompts=6,
            eval_count=6,
            eval_seeds=1,
            fixed_seeds=2,
            minutes=minutes,
            cpu_clock=True,
        )
    return Budget(
        name="decisive",
        batch=recipe.train.model.batch_size,
        group=recipe.train.model.group_size,
        train_steps=recipe.sampler.steps,
        eval_prompts=recipe.prompts.eval.options["count"],
        eval_seeds=recipe.eval.seeds,
        fixed_seeds=recipe.eval.seeds,
        minutes=minutes,
        cpu_clock=True,
    )


def smoke_overrides() -> list[str]:
    """Co-GRPO alternates one model and one schedule iteration, so that a few seconds of
    training reach both phases (the other recipes' mode drops these keys)."""
    return ["train.model_iterations=1", "train.schedule_iterations=1"]


# --------------------------------------------------------------------------- checks


def _get(raw: dict, dotted: str):
    cur = raw
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def validate(sets: list[str]) -> dict:
    """Load every recipe of the ablation with ``sets`` (each keeps the overrides that
    have an effect in its mode, as the runs do): {name: validated Recipe}. A bad
    override raises the recipe loader's one-line :class:`mdmrl.errors.UserError`."""
    from mdmrl import recipe as rc

    out = {}
    for name in sorted({recipe for _, _, recipe, _ in ROWS}):
        path = TEXT_RECIPES / f"{name}.toml"
        out[name] = rc.load(path, rc.effective_overrides(rc.read_toml(path), sets)).recipe
    return out


def comparable(sets: list[str]) -> str | None:
    """None when the three recipes differ only where the ablation means them to (the
    objective, the training mode, the schedule policy); otherwise one line saying which
    section of which recipe differs."""
    mask = recipe_raw("mask_grpo", sets)
    for name in ("naive_grpo", "co_grpo"):
        other = recipe_raw(name, sets)
        for sec in SHARED:
            if _get(other, sec) != _get(mask, sec):
                return (
                    f"recipes/text/{name}.toml: [{sec}] differs from recipes/text/mask_grpo.toml's; "
                    "the rows would not compare one method at a time (make them equal)"
                )
    naive = recipe_raw("naive_grpo", sets)
    if naive.get("schedule") != mask.get("schedule"):
        return "recipes/text/naive_grpo.toml: [schedule] differs from recipes/text/mask_grpo.toml's"
    co = recipe_raw("co_grpo", sets).get("schedule", {})
    opts = co.get("options", {})
    base = {"name": opts.get("base"), "options": opts.get("base_options", {})}
    want = {"name": mask["schedule"]["name"], "options": mask["schedule"].get("options", {})}
    if co.get("name") != "gaussian" or base != want:
        return (
            "recipes/text/co_grpo.toml: [schedule] must be the gaussian policy with base = "
            f"{want['name']!r} and base_options = {want['options']} (MaskGRPO's fixed schedule)"
        )
    return None


# --------------------------------------------------------------------------- runs


def run_all(
    runner: Runner, b: Budget, seeds: list[int], minutes: float, sets: list[str], reverse: bool = False
) -> dict:
    """The base model's evaluation, then every (seed, row) run, seed-major (in the
    opposite order with ``reverse``, so that two processes sharing a sweep meet in its
    middle; the tables list the seeds in order either way)."""
    t = b.train_steps
    extra = list(sets) + (smoke_overrides() if b.name == "smoke" else [])
    raw: dict = {"budget": b.name, "seeds": seeds, "minutes": minutes, "train_steps": t, "sets": sets}
    res = runner.evaluate_untrained("base model", "mask_grpo", list(sets), [t], b.fixed_seeds)
    raw["base"] = res["evals"][str(t)] if res else None
    done: dict[tuple[str, int], dict] = {}
    for s, (key, label, recipe, ov) in sweep_order(seeds, ROWS, reverse):
        r = runner.train(RunSpec(label, recipe, ov + extra, s, final_steps=[t], minutes=minutes))
        if r is not None:
            done[(key, s)] = r
    raw["runs"] = {key: [done[(key, s)] for s in seeds if (key, s) in done] for key, _, _, _ in ROWS}
    return raw


# --------------------------------------------------------------------------- tables


def _vals(runs: list[dict], t: int, metric: str) -> list[float]:
    return [r["final"][str(t)][metric]["mean"] for r in runs]


def _pct(est: tuple[float, float]) -> tuple[float, float]:
    return est[0] * 100, est[1] * 100


def render(raw: dict, b: Budget) -> tuple[str, dict]:
    t, minutes, n = raw["train_steps"], raw["minutes"], len(raw["seeds"])
    runs, base = raw["runs"], raw["base"]
    out: list[str] = []
    nums: dict = {"base": {}, "rows": {}}

    def trained(key: str, metric: str = ACC) -> tuple[float, float]:
        return mean_se(_vals(runs.get(key, []), t, metric))

    base_est = {m: eval_se(base, m) for m in (ACC, FORMAT, "total")}
    nums["base"] = {m: v[0] for m, v in base_est.items()}
    head = (
        f"Held-out accuracy (`{ACC}`), format (`{FORMAT}`) and total reward on {b.eval_prompts} problems x "
        f"{b.eval_seeds} samples at T = {t}, in %, mean ± standard error over {n} training seeds; the base "
        f"model: over its {b.fixed_seeds} sampling seeds. Every run trained for {minutes:g} minutes of CPU "
        "time (one torch thread; evaluation not counted). Δ accuracy: the row minus the base model.\n"
    )

    def cells(key: str) -> list[str]:
        rs = runs.get(key, [])
        acc = trained(key)
        d = difference(acc, base_est[ACC])
        return [
            fmt([r["iterations"] for r in rs], 1),
            fmt(_pct(acc), 1),
            fmt(_pct(d), 1),
            fmt(_pct(trained(key, FORMAT)), 1),
            fmt(_pct(trained(key, "total")), 1),
        ]

    base_cells = [
        "0",
        fmt(_pct(base_est[ACC]), 1),
        "",
        fmt(_pct(base_est[FORMAT]), 1),
        fmt(_pct(base_est["total"]), 1),
    ]
    metrics_head = ["iterations", "accuracy", "Δ accuracy", "format", "total"]

    out.append(
        f"### MaskGRPO's text ablation: re-mask function and truncation γ ({minutes:g} CPU min per run)\n"
    )
    out.append(head)
    rows = [["base model (no RL)", "", "", PAPER["base"], *base_cells]]
    for key in ("naive", "random-0.6", "ar-0", "ar-0.6", "ar-0.8"):
        remask, gamma = {
            "naive": ("—", "—"),
            "random-0.6": ("random", "0.6"),
            "ar-0": ("AR-fading", "0"),
            "ar-0.6": ("AR-fading", "0.6"),
            "ar-0.8": ("AR-fading", "0.8"),
        }[key]
        label = "Naive GRPO" if key == "naive" else "MaskGRPO"
        rows.append([label, remask, gamma, PAPER[key], *cells(key)])
    out.append(table(["row", "re-mask", "γ", "paper, GSM8K-256", *metrics_head], rows))

    out.append(f"\n### Methods at an equal budget of {minutes:g} CPU minutes of training per run\n")
    out.append(head)
    rows = [["base model (no RL)", "—", "llada (fixed)", *base_cells]]
    for key, objective, schedule in (
        ("naive", "GRPO, step replay", "llada (fixed)"),
        ("ar-0.6", "MaskGRPO, AR-fading, γ = 0.6", "llada (fixed)"),
        ("co-grpo", "GRPO, step replay", "learned (τ_s, r)"),
    ):
        method = {"naive": "Naive GRPO", "ar-0.6": "MaskGRPO", "co-grpo": "Co-GRPO"}[key]
        rows.append([method, objective, schedule, *cells(key)])
    out.append(table(["method", "objective", "schedule", *metrics_head], rows))

    for key, _, _, _ in ROWS:
        rs = runs.get(key, [])
        nums["rows"][key] = {
            "label": LABELS[key],
            "accuracy": _vals(rs, t, ACC),
            "format": _vals(rs, t, FORMAT),
            "total": _vals(rs, t, "total"),
            "iterations": [r["iterations"] for r in rs],
            "train_minutes": [r["train_seconds"] / 60 for r in rs],
        }
    text, claims = directions(raw, base_est[ACC])
    out.append(text)
    nums["directions"] = [
        {"claim": c, "a": list(a), "b": list(bb), "difference": list(difference(a, bb))}
        for c, a, bb in claims
    ]
    return "\n".join(out) + "\n", nums


def directions(raw: dict, base: tuple[float, float]) -> tuple[str, list]:
    """The paper's text directions and the method comparison, on held-out accuracy, as
    "a above b" (:func:`_runs.directions_table`), with a plain summary."""
    t, runs = raw["train_steps"], raw["runs"]

    def acc(key: str) -> tuple[float, float]:
        return mean_se(_vals(runs.get(key, []), t, ACC))

    claims = [
        (
            "paper: MaskGRPO random re-mask (γ 0.6) above Naive GRPO — GSM8K 80.4 vs diffu-GRPO 79.8",
            acc("random-0.6"),
            acc("naive"),
        ),
        (
            "paper: AR-fading above random re-mask (both γ 0.6) — GSM8K 83.5 vs 80.4",
            acc("ar-0.6"),
            acc("random-0.6"),
        ),
        (
            "paper: γ 0.6 above γ 0, AR-fading (truncation helps) — GSM8K 84.7 vs 83.5",
            acc("ar-0.6"),
            acc("ar-0"),
        ),
        ("paper: γ 0.6 above γ 0.8, AR-fading (over-truncation harms)", acc("ar-0.6"), acc("ar-0.8")),
        (
            "paper: MaskGRPO (AR-fading, γ 0.6) above Naive GRPO — GSM8K 84.7 vs 79.8",
            acc("ar-0.6"),
            acc("naive"),
        ),
        ("Co-GRPO paper (images): Co-GRPO above Naive GRPO", acc("co-grpo"), acc("naive")),
    ]
    hi, lo = ("ar-0.6", "co-grpo") if acc("ar-0.6")[0] >= acc("co-grpo")[0] else ("co-grpo", "ar-0.6")
    name = {"ar-0.6": "MaskGRPO (AR-fading, γ 0.6)", "co-grpo": "Co-GRPO"}
    claims.append((f"pair: {name[hi]} above {name[lo]}", acc(hi), acc(lo)))
    for key, label in (
        ("naive", "Naive GRPO"),
        ("ar-0.6", "MaskGRPO (AR-fading, γ 0.6)"),
        ("co-grpo", "Co-GRPO"),
    ):
        claims.append((f"RL helps: {label} above the base model", acc(key), base))
    text = (
        "\n### Directions, measured (held-out accuracy)\n\n"
        '"paper" rows are the directions MaskGRPO reports for GSM8K (its ablation: diffu-GRPO → + managed '
        "randomness → + AR-like re-mask → + truncation) and Co-GRPO reports for images; Naive GRPO stands in for "
        "diffu-GRPO (both are GRPO without MaskGRPO's re-mask estimator: diffu-GRPO scores the completion fully "
        "masked with a randomly masked prompt, Naive GRPO replays the block sampler's own steps). A direction "
        "holds only when a − b exceeds two standard errors of the difference (over training seeds; the base "
        "model's over sampling seeds), in accuracy as a fraction.\n\n"
        + directions_table(claims)
        + "\n\n"
        + directions_summary(claims)
        + "\n"
    )
    return text, claims


def _flat(sets: list[list[str]] | None) -> list[str]:
    return [s for group in (sets or []) for s in group]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per row (>= 3 for the tables)")
    ap.add_argument(
        "--minutes",
        type=float,
        help=f"CPU minutes of training per run (default {MINUTES:g}; --smoke: {SMOKE_MINUTES:g})",
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        nargs="+",
        metavar="KEY=VALUE",
        help="a recipe override applied to every row and to the base model (as mdmrl run --set)",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="4 completions per iteration, 6 problems, seconds (tests)"
    )
    add_sweep_arguments(ap, "text_ablate", reverse=True)
    args = ap.parse_args(argv)
    from mdmrl.errors import UserError

    sets = _flat(args.sets)
    try:
        mask = validate(sets)["mask_grpo"]
        problem = comparable(sets)
    except UserError as e:
        print(f"text_ablate.py: error: {e}", file=sys.stderr)
        return 2
    if problem:
        print(f"text_ablate.py: error: {problem}", file=sys.stderr)
        return 2
    if args.minutes is not None and args.minutes <= 0:
        print("text_ablate.py: error: --minutes must be > 0", file=sys.stderr)
        return 2
    setup_threads(args.threads)
    minutes = args.minutes if args.minutes is not None else (SMOKE_MINUTES if args.smoke else MINUTES)
    b = budget_for(mask, minutes, args.smoke)
    out_dir = Path(args.out) if args.out else OUT / "text_ablate" / b.name
    runner = Runner(b, out_dir, device=args.device, cache_only=args.partial, recipes=TEXT_RECIPES)
    run_and_report(
        "text_ablate.py",
        f"## MaskGRPO's text ablation and the method comparison on the text world (budget {b.name}, "
        f"{args.seeds} seeds)",
        argv,
        args.json,
        runner,
        lambda: run_all(runner, b, list(range(args.seeds)), minutes, sets, reverse=args.reverse),
        render,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
