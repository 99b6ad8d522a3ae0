"""Wall time per training sample of an RL iteration, split into its parts: the
ablation recipe of docs/results.md against the quickstart's recipe and faster ones,
measured interleaved on the same commit and the same backbone.

Every configuration is ``recipes/shapes/co_grpo.toml`` plus overrides, trained by the
engine's own ``Trainer.iterate`` (the code ``mdmrl run`` runs). One timed call is one
model-phase or one schedule-phase iteration; the per-sample figure of a configuration
is the plan-weighted mean of the two phases' medians divided by the images per
iteration. The split comes from the iteration's own metrics row (``time_rollout``,
``time_reward``, ``time_kl``, ``time_prepare``, ``time_replay_backward``,
``time_optimizer``).

    python benchmarks/iteration_cost.py                    # CPU, 2 threads
    python benchmarks/iteration_cost.py --configs ablation,fast --json /tmp/ic.json
    python benchmarks/iteration_cost.py --quick            # smoke run
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import common
import torch

RECIPE = common.REPO / "recipes" / "shapes" / "co_grpo.toml"

#: The ablation runs of docs/results.md: guided (s = 3) rollouts and replays, 2 prompts x
#: G = 8 = 16 images per iteration, T = 8, half the steps replayed, 2 minibatches; no KL
#: monitor (it did not exist).
ABLATION = [
    "schedule.options.base_options.cfg_scale=3.0",
    "train.model.batch_size=16",
    "train.schedule.batch_size=16",
    "logging.kl_every=0",
]

CONFIGS: dict[str, list[str]] = {
    "ablation": ABLATION,
    # the quickstart recipe as shipped (guidance-free, 32 images, KL monitor on)
    "quickstart": [],
    # guidance-free, 64 images per iteration, a quarter of the steps replayed, one minibatch
    "fast": [
        "train.model.batch_size=64",
        "train.schedule.batch_size=64",
        "train.timestep_fraction=0.25",
        "train.minibatches=1",
    ],
}

#: the parts of an iteration, in the order printed
PARTS = ("time_rollout", "time_reward", "time_kl", "time_prepare", "time_replay_backward", "time_optimizer")

COMMON = ["logging.image_every=0", "logging.tensorboard=false", "eval.before=false", "eval.after=false"]


def build(name: str, overrides: list[str], device: torch.device, quick: bool, run_dir: Path):
    from mdmrl import recipe as rc
    from mdmrl.build import build_parts
    from mdmrl.engine import Trainer

    extra = list(overrides) + COMMON + [f'device="{device.type}"']
    if quick:
        extra += [
            "train.model.batch_size=8",
            "train.schedule.batch_size=8",
            "train.model.group_size=4",
            "train.schedule.group_size=4",
            "sampler.steps=2",
        ]
    loaded = rc.load(RECIPE, extra)
    parts = build_parts(loaded, device)
    trainer = Trainer(loaded, parts, run_dir / name, device, log=lambda s: None)
    first = {
        phase: trainer.plan.index(next(p for p in trainer.plan if p[0] == phase))
        for phase in ("model", "schedule")
    }
    share = {phase: sum(p[0] == phase for p in trainer.plan) / len(trainer.plan) for phase in first}
    images = {
        "model": loaded.recipe.train.model.batch_size,
        "schedule": loaded.recipe.train.schedule.batch_size,
    }
    return trainer, first, share, images


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated configurations to compare (of {', '.join(CONFIGS)}); the first is the baseline",
    )
    args = p.parse_args(argv)
    device = common.setup(args)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; available: {', '.join(CONFIGS)}")
    reps = common.repeats(args, 5)
    common.header("RL iteration cost per training sample (shapes world, Co-GRPO engine)", device)
    tmp = Path(tempfile.mkdtemp(prefix="mdmrl-iteration-cost-"))
    built = {n: build(n, CONFIGS[n], device, args.quick, tmp) for n in names}
    rows: dict[str, dict[str, list[dict]]] = {n: {"model": [], "schedule": []} for n in names}
    walls: dict[str, dict[str, list[float]]] = {n: {"model": [], "schedule": []} for n in names}
    for rep in range(args.warmup + reps):
        for phase in ("model", "schedule"):
            for n in names:  # interleaved: every configuration sees the same machine load
                trainer, first, _, _ = built[n]
                trainer.iteration = first[phase]
                t0 = time.perf_counter()
                row = trainer.iterate()
                common.sync(device)
                wall = time.perf_counter() - t0
                if rep >= args.warmup:
                    rows[n][phase].append(row)
                    walls[n][phase].append(wall)
    results: dict[str, dict] = {}
    for n in names:
        _, _, share, images = built[n]
        per_phase = {}
        for phase in ("model", "schedule"):
            wall = statistics.median(walls[n][phase])
            split = {k: statistics.median(r.get(k, 0.0) for r in rows[n][phase]) for k in PARTS}
            per_phase[phase] = {"wall_s": wall, "images": images[phase], "split_s": split}
        per_sample = sum(share[ph] * per_phase[ph]["wall_s"] / per_phase[ph]["images"] for ph in per_phase)
        results[n] = {
            "overrides": CONFIGS[n],
            "phases": per_phase,
            "share": share,
            "ms_per_sample": 1e3 * per_sample,
        }
    base = names[0]
    table_rows = []
    for n in names:
        r = results[n]
        r["speedup_vs_" + base] = results[base]["ms_per_sample"] / r["ms_per_sample"]
        for ph in ("model", "schedule"):
            f = r["phases"][ph]
            table_rows.append(
                [n, ph, f["images"], f"{f['wall_s']:.2f}"]
                + [f"{f['split_s'][k]:.2f}" for k in PARTS]
                + [
                    f"{r['ms_per_sample']:.1f}" if ph == "model" else "",
                    f"{r['speedup_vs_' + base]:.2f}" if ph == "model" else "",
                ]
            )
    print(
        common.table(
            table_rows,
            ["config", "phase", "images", "iteration s"]
            + [k[5:] for k in PARTS]
            + ["ms / sample", f"× vs {base}"],
        )
    )
    targets = {}
    if len(names) > 1:
        best = max(names[1:], key=lambda n: results[n]["speedup_vs_" + base])
        targets["per-sample speed-up"] = common.target(results[best]["speedup_vs_" + base], ">= 3")
    return common.finish(args, common.environment(device), results, targets)


if __name__ == "__main__":
    common.run_main(main)
