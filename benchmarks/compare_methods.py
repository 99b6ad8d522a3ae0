"""Naive GRPO, MaskGRPO (confidence and emerge samplers) and Co-GRPO at an equal
wall-clock training budget per run, plus MaskGRPO's truncation (gamma) ablation, on
the embedded shapes world.

    python benchmarks/compare_methods.py [--seeds 3] [--minutes M] [--json PATH]

Every run is a shipped recipe under ``recipes/shapes/`` plus overrides (budget sizing,
the sampler, gamma). A run trains until ``--minutes`` of wall-clock time went into its
iterations (the iteration in progress is finished), then is evaluated on held-out
prompts at the training step count. Runs are ordered seed by seed so that every method
meets the same machine load over the session. Finished runs are cached under
``benchmarks/out/compare/<budget>/``; see docs/results.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import (  # noqa: E402
    DECISIVE,
    OUT,
    Budget,
    Runner,
    RunSpec,
    add_sweep_arguments,
    directions_table,
    eval_se,
    fmt,
    mean_se,
    pick_budget,
    replace,
    run_and_report,
    setup_threads,
    sweep_order,
    table,
)

BUDGETS = {
    "quick": Budget(
        name="quick",
        batch=16,
        group=8,
        train_steps=8,
        model_iterations=1,
        schedule_iterations=1,
        eval_prompts=12,
        fixed_seeds=3,
        minutes=0.25,
    ),
    # 21 runs of 0.75 min plus evaluations: about 18 minutes on 1 thread of a 2-core CPU
    "full": Budget(
        name="full",
        batch=16,
        group=8,
        train_steps=8,
        model_iterations=1,
        schedule_iterations=1,
        eval_prompts=24,
        fixed_seeds=3,
        minutes=0.75,
    ),
    # 3.5 CPU minutes of training per run (about 3000 samples at 70 ms each, against
    # about 270 in "full"'s 0.75 min at 165 ms): about 80 minutes for 3 seeds on 1 thread
    "decisive": replace(DECISIVE, minutes=3.5, cpu_clock=True),
}

#: (label, recipe, overrides, sampler shown in the table)
METHODS: list[tuple[str, str, list[str], str]] = [
    ("Naive GRPO", "naive_grpo", [], "confidence"),
    ("MaskGRPO", "mask_grpo", ['sampler.name="confidence"'], "confidence"),
    ("MaskGRPO", "mask_grpo", ['sampler.name="emerge"'], "emerge"),
    ("Co-GRPO", "co_grpo", [], "confidence"),
]

#: MaskGRPO's truncation gamma: 0.0 = no truncation (mask levels over all of (0, 1)).
GAMMAS = (0.0, 0.6, 0.8, 0.9)


def key(label: str, sampler: str) -> str:
    return f"{label} ({sampler})"


def run_all(runner: Runner, b: Budget, seeds: list[int], minutes: float, reverse: bool = False) -> dict:
    """Untrained evaluations, then every (seed, configuration) run, seed-major (backwards
    with ``reverse``; the tables list the seeds in order either way)."""
    t = b.train_steps
    raw: dict = {
        "budget": b.name,
        "seeds": seeds,
        "minutes": minutes,
        "train_steps": t,
        "base": {},
        "runs": {},
    }
    configs: list[tuple[str, str, list[str]]] = [(key(lab, smp), rec, ov) for lab, rec, ov, smp in METHODS]
    configs += [(f"MaskGRPO γ={g}", "mask_grpo", [f"objective.options.gamma={g}"]) for g in GAMMAS]
    # Co-GRPO alternates N_m model and N_s schedule iterations; sized so that a short
    # budget reaches both phases (Runner.load drops them for the single-phase recipes)
    plan = [
        f"train.model_iterations={b.model_iterations}",
        f"train.schedule_iterations={b.schedule_iterations}",
    ]
    configs = [(name, rec, plan + ov) for name, rec, ov in configs]
    # the untrained model under each recipe's sampler and schedule (the gain's baseline)
    for name, rec, ov in configs[: len(METHODS)]:
        res = runner.evaluate_untrained(f"{name} untrained", rec, ov, [t], b.fixed_seeds)
        raw["base"][name] = res["evals"][str(t)] if res else None
    done: dict[tuple[str, int], dict] = {}
    for s, (name, rec, ov) in sweep_order(seeds, configs, reverse):
        res = runner.train(RunSpec(name, rec, ov, s, final_steps=[t], minutes=minutes))
        if res is not None:
            done[(name, s)] = res
    for name, _, _ in configs:
        raw["runs"][name] = [done[(name, s)] for s in seeds if (name, s) in done]
    return raw


def _vals(runs: list[dict], t: int, metric: str = "total") -> list[float]:
    return [r["final"][str(t)][metric]["mean"] for r in runs]


def render(raw: dict, b: Budget) -> tuple[str, dict]:
    t, minutes = raw["train_steps"], raw["minutes"]
    n = len(raw["seeds"])
    runs, base = raw["runs"], raw["base"]
    out: list[str] = []
    nums: dict = {"methods": {}, "gamma": {}}
    out.append(
        f"### Methods at an equal budget of {minutes:g} min of training per run\n\n"
        f"Held-out total reward at T = {t} ({b.eval_prompts} prompts), mean ± standard error over {n} "
        f"training seeds; untrained: over {b.fixed_seeds} sampling seeds. Gain per minute = (held-out − "
        "untrained) / training minutes of the run.\n"
    )
    rows = []
    for lab, _, _, smp in METHODS:
        name = key(lab, smp)
        rs = runs[name]
        b0 = eval_se(base.get(name))
        vals = _vals(rs, t)
        mins = [r["train_seconds"] / 60 for r in rs]
        gains = [(v - b0[0]) / m for v, m in zip(vals, mins, strict=True) if not math.isnan(b0[0])]
        its = [r["iterations"] for r in rs]
        rows.append(
            [
                lab,
                smp,
                fmt(its, 1),
                fmt(b0),
                fmt(vals),
                fmt(_vals(rs, t, "shapes-alignment")),
                fmt(_vals(rs, t, "shapes-quality")),
                fmt(gains, 4),
            ]
        )
        nums["methods"][name] = {
            "untrained": b0[0],
            "heldout": vals,
            "gain_per_minute": gains,
            "iterations": its,
            "train_minutes": mins,
        }
    out.append(
        table(
            [
                "method",
                "sampler",
                "iterations",
                "untrained",
                "held-out",
                "alignment",
                "quality",
                "gain / min",
            ],
            rows,
        )
    )
    out.append(
        f"\n### MaskGRPO truncation γ ({minutes:g} min per run, the recipe's sampler)\n\n"
        "Mask levels t_j lie in (γ, 1); γ = 0 is no truncation. Mean ± standard error over "
        f"{n} training seeds.\n"
    )
    rows = []
    for g in GAMMAS:
        rs = runs[f"MaskGRPO γ={g}"]
        vals = _vals(rs, t)
        rows.append([g, fmt([r["iterations"] for r in rs], 1), fmt(vals)])
        nums["gamma"][str(g)] = vals
    out.append(table(["γ", "iterations", "held-out"], rows))
    out.append(directions(raw))
    return "\n".join(out) + "\n", nums


def directions(raw: dict) -> str:
    """Every method pair, the papers' directions (MaskGRPO and Co-GRPO each above Naive
    GRPO; MaskGRPO's emerge sampler below the confidence sampler before RL and above it
    after; truncation γ = 0.8 above none and above over-truncation), as "a above b"."""
    t, runs = raw["train_steps"], raw["runs"]
    names = [key(lab, smp) for lab, _, _, smp in METHODS]

    def trained(name: str) -> tuple[float, float]:
        return mean_se(_vals(runs.get(name, []), t))

    # every pair, the higher mean first (a pair's direction is what is measured)
    claims = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            hi, lo = (a, b) if trained(a)[0] >= trained(b)[0] else (b, a)
            claims.append((f"pair: {hi} above {lo}", trained(hi), trained(lo)))
    naive, mask_c, mask_e, co = names
    claims += [
        (f"paper: {mask_c} above {naive}", trained(mask_c), trained(naive)),
        (f"paper: {co} above {naive}", trained(co), trained(naive)),
        (
            f"paper: before RL, {mask_c} above {mask_e}",
            eval_se(raw["base"].get(mask_c)),
            eval_se(raw["base"].get(mask_e)),
        ),
        (f"paper: after RL, {mask_e} above {mask_c}", trained(mask_e), trained(mask_c)),
    ]
    gamma = {g: mean_se(_vals(runs.get(f"MaskGRPO γ={g}", []), t)) for g in GAMMAS}
    claims += [
        ("paper: γ = 0.8 above no truncation (γ = 0)", gamma[0.8], gamma[0.0]),
        ("paper: γ = 0.8 above over-truncation (γ = 0.9)", gamma[0.8], gamma[0.9]),
    ]
    return (
        "\n### Directions, measured\n\n"
        '"pair" rows give every method pair in the order measured; "paper" rows a direction '
        "the MaskGRPO or Co-GRPO paper reports. A direction holds only when a − b exceeds two "
        "standard errors of the difference (over training seeds; for untrained models over "
        "sampling seeds).\n\n" + directions_table(claims) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--seeds", type=int, default=3, help="training seeds per configuration (>= 3 for the tables)"
    )
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    ap.add_argument(
        "--minutes", type=float, help="wall-clock training minutes per run (default: the budget's)"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny random backbone, seconds (tests)")
    add_sweep_arguments(ap, "compare", reverse=True)
    args = ap.parse_args(argv)
    setup_threads(args.threads)
    b = pick_budget(args.budget, BUDGETS, args.smoke)
    minutes = args.minutes if args.minutes is not None else b.minutes
    out_dir = Path(args.out) if args.out else OUT / "compare" / b.name
    runner = Runner(b, out_dir, device=args.device, cache_only=args.partial)
    run_and_report(
        "compare_methods.py",
        f"## Method comparison on the shapes world (budget {b.name}, {args.seeds} seeds)",
        argv,
        args.json,
        runner,
        lambda: run_all(runner, b, list(range(args.seeds)), minutes, reverse=args.reverse),
        render,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
