"""Guided vs guidance-free sampling and training on the shapes MDM, side by side.

A guidance-free step (CFG scale s = 1 for every row, declared by the schedule) runs
the backbone on the B conditional rows instead of the 2B rows of classifier-free
guidance (docs/sampling.md). This script measures what that buys, interleaving the
two configurations call by call (same backbone, prompts, seeds, batch and T):

- rollout: images per second of ``ConfidenceSampler.sample`` with the Meissonic
  schedule at s = 3 (guided) and s = 1 (guidance-free), at each T;
- update: one trained step (``sampler.replay_step`` forward + backward, batch B) of a
  trajectory of each kind.

The ratio guided / guidance-free is expected near 2 (half the forward rows); the
sampler's per-token work and the conditioning are not halved, so it is a little less.

    python benchmarks/guidance.py
    python benchmarks/guidance.py --device cuda
    python benchmarks/guidance.py --quick --json /tmp/guidance.json
"""

from __future__ import annotations

from typing import Any

import common
import torch

KINDS = {"guided": 3.0, "guidance-free": 1.0}


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="images per call (default 32; 4 with --quick)")
    p.add_argument("--steps", default=None, help="comma list of T (default 8,16; 4 with --quick)")
    args = p.parse_args(argv)
    device = common.setup(args)
    from mdmrl_plugins.cogrpo.sampler import ConfidenceSampler
    from mdmrl_plugins.cogrpo.schedules import MeissonicOptions, MeissonicSchedule

    batch = args.batch or (4 if args.quick else 32)
    steps_list = [int(x) for x in (args.steps or ("4" if args.quick else "8,16")).split(",")]
    reps = common.repeats(args, 5)
    env = common.environment(device)
    common.header(f"guided (s = 3) vs guidance-free (s = 1) sampling, shapes-mdm, B = {batch}", device)
    bb = common.shapes_backbone(device, quick=args.quick)
    bb.eval()
    sampler = ConfidenceSampler()
    prompts = common.shapes_prompts(batch)
    seeds = torch.arange(batch) + 100
    schedules = {k: MeissonicSchedule(MeissonicOptions(cfg_scale=s)) for k, s in KINDS.items()}

    rows, results, targets = [], {"batch": batch, "points": []}, {}
    for steps in steps_list:

        def rollout(kind: str, steps: int = steps):
            with torch.no_grad():
                return sampler.sample(bb, schedules[kind], prompts, steps, seeds)

        trajs = {k: rollout(k) for k in KINDS}

        def update(kind: str, steps: int = steps, trajs: dict = trajs):
            bb.zero_grad(set_to_none=True)
            cond, uncond = bb.encode_prompts(prompts), bb.null_conditioning(batch)
            rep = sampler.replay_step(bb, trajs[kind], steps // 2, cond, uncond)
            rep.model_log_prob.sum().backward()

        fns = {f"rollout {k}": (lambda k=k: rollout(k)) for k in KINDS}
        fns.update({f"update {k}": (lambda k=k: update(k)) for k in KINDS})
        t = common.time_interleaved(fns, device, reps, args.warmup)
        point: dict[str, Any] = {"steps": steps, "load_average_1m": common.load_average()[0]}
        for k in KINDS:
            point[k] = {
                "rollout": t[f"rollout {k}"].to_dict(),
                "update": t[f"update {k}"].to_dict(),
                "images_per_s": batch / t[f"rollout {k}"].median,
            }
        point["rollout_ratio"] = t["rollout guided"].median / t["rollout guidance-free"].median
        point["update_ratio"] = t["update guided"].median / t["update guidance-free"].median
        results["points"].append(point)
        rows.append(
            [
                steps,
                point["guided"]["images_per_s"],
                point["guidance-free"]["images_per_s"],
                point["rollout_ratio"],
                t["update guided"].median,
                t["update guidance-free"].median,
                point["update_ratio"],
            ]
        )
        targets[f"T={steps}: guided / guidance-free rollout time (half the forward rows)"] = common.target(
            point["rollout_ratio"], ">= 1.5"
        )
    headers = [
        "T",
        "guided img/s",
        "free img/s",
        "rollout ratio",
        "guided upd s",
        "free upd s",
        "update ratio",
    ]
    print(common.table(rows, headers))
    return common.finish(args, env, results, targets)


if __name__ == "__main__":
    common.run_main(main)
