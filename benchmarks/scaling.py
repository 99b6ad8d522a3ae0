"""Scaling curves: rollout and training time against grid size, steps T and batch G.

Three sweeps on the shapes MDM (random weights with the architecture of the shipped
weights, or of the option defaults while none are committed; the timing does not
depend on the weights' values), each point the
median of --repeats calls after one warm-up call at that size (the rollout that
records the trajectory used by the training measurement is the rollout's warm-up):

- tokens: grids 8x8, 12x12, 16x16, 24x24 (N = 64 ... 576) at fixed B and T; training
  time = one trained step (``sampler.replay_step`` forward + backward, batch B, CFG);
- steps: T = 4, 8, 16, 32 on the 16x16 grid; training time = one full update over
  all T steps (``grpo`` objective, terms back-propagated in chunks of 4, as the
  engine does with ``timestep_fraction = 1``);
- batch: G = B = 8, 16, 32, 64 on the 16x16 grid; training time = one trained step.

For each curve the growth exponent k of time ~ x^k is the least-squares slope in
log-log axes. Rollout and training are expected to be linear (k ~ 1) in T and B; in
N the joint attention over L + N positions adds a quadratic part. The curves are
written as PNG files (``--figures``, default docs/figures for a full run).

    python benchmarks/scaling.py
    python benchmarks/scaling.py --device cuda
    python benchmarks/scaling.py --quick --json /tmp/scaling.json --figures /tmp/figs
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common
import torch

SWEEPS = ("tokens", "steps", "batch")
LABELS = {"tokens": "image tokens N", "steps": "steps T", "batch": "batch B = G"}


def measure_point(
    device, grid: int, batch: int, steps: int, quick: bool, training: str, reps: int, warmup: int
) -> dict[str, Any]:
    """Rollout time and training time (``step``: one replay fwd+bwd; ``update``: all T
    terms through the grpo objective) of one configuration."""
    from mdmrl.interfaces import Policies
    from mdmrl_plugins.cogrpo.objective import GRPOObjective
    from mdmrl_plugins.cogrpo.sampler import ConfidenceSampler
    from mdmrl_plugins.cogrpo.schedules import MeissonicSchedule

    bb = common.shapes_backbone(device, grid=grid, quick=quick)
    schedule, sampler = MeissonicSchedule(), ConfidenceSampler()
    prompts = common.shapes_prompts(batch)
    seeds = torch.arange(batch) + 100

    def rollout():
        bb.eval()
        with torch.no_grad():
            return sampler.sample(bb, schedule, prompts, steps, seeds)

    traj = rollout()
    with torch.no_grad():
        cond, uncond = bb.encode_prompts(prompts), bb.null_conditioning(batch)
    adv = torch.randn(batch, generator=torch.Generator().manual_seed(0)).to(device)
    objective = GRPOObjective()
    policies = Policies(bb, schedule, sampler, cond, uncond)

    def train():
        bb.train()
        bb.zero_grad(set_to_none=True)
        if training == "step":
            sampler.replay_step(bb, traj, steps // 2, cond, uncond).model_log_prob.sum().backward()
            return
        terms = list(range(steps))
        for i in range(0, steps, 4):
            chunk = terms[i : i + 4]
            (objective.loss(policies, traj, adv, chunk, "model").loss * (len(chunk) / steps)).backward()

    # the recording rollout above is the rollout's warm-up call; warm the training up too
    for _ in range(warmup):
        train()
    tm = common.time_interleaved({"rollout": rollout, "train": train}, device, reps, warmup=0)
    return {
        "grid": grid,
        "tokens": grid * grid,
        "batch": batch,
        "steps": steps,
        "rollout": tm["rollout"].to_dict(),
        "train": tm["train"].to_dict(),
        "training_unit": "one trained step (replay fwd+bwd)"
        if training == "step"
        else "full update (T terms)",
        "load_average_1m": common.load_average()[0],
    }


def plot(sweep: str, points: list[dict[str, Any]], slopes: dict[str, float], path: Path, title: str) -> None:
    """One log-log PNG: rollout and training time against the swept variable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [pt["x"] for pt in points]
    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=110)
    for key, style in (("rollout", "o-"), ("train", "s--")):
        ys = [pt[key]["median_s"] for pt in points]
        ax.loglog(xs, ys, style, label=f"{key} (slope {slopes[key]:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(LABELS[sweep])
    ax.set_ylabel("seconds (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sweeps", default=",".join(SWEEPS), help="comma list of tokens, steps, batch")
    p.add_argument("--grids", default=None, help="grid sides of the tokens sweep (default 8,12,16,24)")
    p.add_argument("--step-counts", default=None, help="T values of the steps sweep (default 4,8,16,32)")
    p.add_argument("--batches", default=None, help="B values of the batch sweep (default 8,16,32,64)")
    p.add_argument("--batch", type=int, default=None, help="B of the tokens and steps sweeps (default 4)")
    p.add_argument("--steps", type=int, default=None, help="T of the tokens and batch sweeps (default 8)")
    p.add_argument(
        "--figures",
        default=None,
        help="folder for the PNG curves (default docs/figures; none with --quick unless given)",
    )
    args = p.parse_args(argv)
    device = common.setup(args)
    reps = common.repeats(args, 3)
    quick = args.quick

    def ints(text: str | None, full: str, small: str) -> list[int]:
        return [int(x) for x in (text or (small if quick else full)).split(",") if x.strip()]

    grids = ints(args.grids, "8,12,16,24", "4,8")
    step_counts = ints(args.step_counts, "4,8,16,32", "2,4")
    batches = ints(args.batches, "8,16,32,64", "2,4")
    batch = args.batch or (2 if quick else 4)
    steps = args.steps or (2 if quick else 8)
    arch = common.shapes_arch(quick)
    base_grid = 8 if quick else 16
    figures = Path(args.figures) if args.figures else (None if quick else common.REPO / "docs" / "figures")
    sweeps = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    for s in sweeps:
        if s not in SWEEPS:
            p.error(f"--sweeps: unknown sweep {s!r}; choose from {', '.join(SWEEPS)}")
    env = common.environment(device)
    common.header("scaling of rollout and training time (shapes-mdm, random weights)", device)
    print(f"   architecture {arch}; CFG; median of {reps} calls after a warm-up at each size")

    results: dict[str, Any] = {"architecture": arch}
    targets: dict[str, Any] = {}
    for sweep in sweeps:
        if sweep == "tokens":
            configs = [dict(grid=g, batch=batch, steps=steps, training="step", x=g * g) for g in grids]
            what = f"B={batch}, T={steps}; training = one trained step"
        elif sweep == "steps":
            configs = [
                dict(grid=base_grid, batch=batch, steps=t, training="update", x=t) for t in step_counts
            ]
            what = f"grid {base_grid}x{base_grid}, B={batch}; training = full update over T steps"
        else:
            configs = [dict(grid=base_grid, batch=b, steps=steps, training="step", x=b) for b in batches]
            what = f"grid {base_grid}x{base_grid}, T={steps}; training = one trained step"
        print(f"-- {sweep} sweep ({what})")
        points = []
        for c in configs:
            pt = measure_point(
                device, c["grid"], c["batch"], c["steps"], quick, c["training"], reps, args.warmup
            )
            pt["x"] = c["x"]
            points.append(pt)
        xs = [pt["x"] for pt in points]
        slopes = {
            k: common.log_log_slope(xs, [pt[k]["median_s"] for pt in points]) for k in ("rollout", "train")
        }
        rows = [
            [
                pt["x"],
                pt["grid"],
                pt["batch"],
                pt["steps"],
                pt["rollout"]["median_s"],
                pt["train"]["median_s"],
                pt["load_average_1m"],
            ]
            for pt in points
        ]
        print(common.table(rows, [LABELS[sweep], "grid", "B", "T", "rollout s", "train s", "load 1m"]))
        print(
            f"   growth exponent (log-log slope): rollout {slopes['rollout']:.2f}, training {slopes['train']:.2f}"
        )
        entry: dict[str, Any] = {
            "x_label": LABELS[sweep],
            "setting": what,
            "points": points,
            "slopes": slopes,
        }
        if figures is not None:
            path = figures / f"scaling_{sweep}.png"
            plot(sweep, points, slopes, path, f"shapes-mdm, {common.device_label(device)}\n{what}")
            entry["figure"] = str(path)
            print(f"   figure: {path}")
        results[sweep] = entry
        if sweep in ("steps", "batch"):
            for k in ("rollout", "train"):
                targets[f"{sweep} sweep, {k} growth exponent (linear expected)"] = common.target(
                    slopes[k], "<= 1.15"
                )
    return common.finish(args, env, results, targets)


if __name__ == "__main__":
    common.run_main(main)
