"""Sampler revisions side by side: the confidence sampler of the working tree against
the same file at git revisions, in one process, on one backbone, rollouts alternated.

On a shared machine the speed drifts by 10-20 % within minutes, so two runs of
sampler_overhead.py made at different revisions compare badly. This script loads
``plugins/cogrpo/sampler.py`` as it is at each revision (``git show REV:path``) as a
module of its own, builds each version's sampler with the same options, and times
rollouts of the versions in turn (the order rotates every round), with the time
inside ``backbone.forward`` measured around each call. Only the sampler file varies:
the backbone, schedules and core are the working tree's, so a revision whose sampler
needs an older core cannot be loaded (the script says which and why).

Per version it prints the median rollout wall time, the median time outside the
forwards (the sampler's own work), the in-run ratio (wall / time inside the forwards
of the same call, the figure of sampler_overhead.py least moved by other processes),
and whether it sampled the same tokens and log-probs as the first version
(``torch.equal``).

    python benchmarks/sampler_revisions.py --revs bcd42aa
    python benchmarks/sampler_revisions.py --revs bcd42aa,36ffc04 --models shapes-mdm --rng per_sample
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import types
from typing import Any

import common
import torch
from sampler_overhead import add_rollout_arguments, build_backbone, build_case, models_of

#: The file compared, relative to the repository root.
SAMPLER = "plugins/cogrpo/sampler.py"
#: The label of the working tree's sampler (always measured, first).
WORK = "work"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(common.REPO), *args], capture_output=True, text=True)


def load_sampler(rev: str, index: int) -> tuple[types.ModuleType, str]:
    """The sampler module at ``rev`` (``work``: the working tree's file) and the commit
    it came from. Exits with one line when the revision or its file cannot be read, or
    when the file does not import against the working tree's core."""
    if rev == WORK:
        source, commit = (common.REPO / SAMPLER).read_text(), WORK
    else:
        shown = _git("show", f"{rev}:{SAMPLER}")
        if shown.returncode != 0:
            reason = (shown.stderr.strip().splitlines() or ["git failed"])[-1]
            sys.exit(f"--revs: cannot read {SAMPLER} at {rev!r}: {reason}")
        source, commit = shown.stdout, _git("rev-parse", "--short", rev).stdout.strip()
    name = f"mdmrl_plugins.cogrpo._sampler_revision_{index}"
    module = types.ModuleType(name)
    module.__file__ = f"{rev}:{SAMPLER}"
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    except Exception as exc:  # an older file against a newer core: say so in one line
        sys.exit(f"--revs: {SAMPLER} at {rev!r} does not load against this working tree: {exc}")
    return module, commit


def compare(
    case: dict[str, Any], samplers: dict[str, Any], seeds: torch.Tensor, reps: int, warmup: int, device
) -> dict[str, Any]:
    """Alternate the versions' rollouts; per version the wall and inside-forward times."""
    bb, schedule, prompts, steps = case["backbone"], case["schedule"], case["prompts"], case["steps"]

    def rollout(sampler) -> tuple[Any, float, float]:
        with common.time_inside(bb, device) as spent, torch.no_grad():
            common.sync(device)
            t0 = time.perf_counter()
            traj = sampler.sample(bb, schedule, prompts, steps, seeds)
            common.sync(device)
            wall = time.perf_counter() - t0
        return traj, wall, spent[0]

    labels = list(samplers)
    for _ in range(warmup):
        for label in labels:
            rollout(samplers[label])
    walls: dict[str, list[float]] = {label: [] for label in labels}
    inside: dict[str, list[float]] = {label: [] for label in labels}
    trajs: dict[str, Any] = {}
    for r in range(reps):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            trajs[label], wall, spent = rollout(samplers[label])
            walls[label].append(wall)
            inside[label].append(spent)
    first = trajs[labels[0]]
    out = {}
    for label in labels:
        t = trajs[label]
        out[label] = {
            "rollout": common.Timing(walls[label]).to_dict(),
            "inside_forward_median_s": statistics.median(inside[label]),
            "outside_forward_median_s": statistics.median(w - f for w, f in zip(walls[label], inside[label])),
            "ratio_in_run": statistics.median(w / f for w, f in zip(walls[label], inside[label])),
            "same_as_first": bool(
                torch.equal(t.tokens, first.tokens) and torch.equal(t.model_log_probs, first.model_log_probs)
            ),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    add_rollout_arguments(p)
    p.add_argument(
        "--revs",
        required=True,
        help=f"comma list of git revisions whose {SAMPLER} is compared with the working tree's",
    )
    p.add_argument("--rng", default="per_sample", help="comma list of sampler rng modes (per_sample, shared)")
    args = p.parse_args(argv)
    device = common.setup(args)
    batch = args.batch or (2 if args.quick else 8)
    steps = args.steps or (4 if args.quick else 16)
    reps = common.repeats(args, 12)
    models = models_of(p, args)
    rngs = [r.strip() for r in args.rng.split(",") if r.strip()]
    for rng in rngs:
        if rng not in ("per_sample", "shared"):
            p.error(f"--rng: unknown mode {rng!r}; choose per_sample, shared")
    revs = [WORK] + [r.strip() for r in args.revs.split(",") if r.strip()]
    modules, commits = {}, {}
    for i, rev in enumerate(revs):
        label = rev if rev not in modules else f"{rev}#{i}"
        modules[label], commits[label] = load_sampler(rev, i)
    env = common.environment(device)
    common.header("sampler revisions: the same rollouts with the sampler file of each revision", device)
    print(f"   B={batch}, T={steps}; {reps} rounds, versions alternated; revisions {commits}")

    rows, cases = [], []
    for model in models:
        backbone = build_backbone(model, device, args.quick)
        for rng in rngs:
            case = build_case(model, backbone, rng, batch, steps)
            rounding = case["sampler"].options.rounding
            samplers = {
                label: mod.ConfidenceSampler(mod.ConfidenceOptions(rng=rng, rounding=rounding))
                for label, mod in modules.items()
            }
            seeds = torch.arange(batch, dtype=torch.long) + 100
            res = compare(case, samplers, seeds, reps, args.warmup, device)
            base = res[WORK]["outside_forward_median_s"]
            for label, r in res.items():
                rows.append(
                    [
                        model,
                        rng,
                        label,
                        commits[label],
                        r["rollout"]["median_s"] * 1e3,
                        r["outside_forward_median_s"] * 1e3,
                        r["outside_forward_median_s"] / base if base > 0 else float("nan"),
                        r["ratio_in_run"],
                        "yes" if r["same_as_first"] else "NO",
                    ]
                )
            cases.append({"model": model, "rng": rng, "batch": batch, "steps": steps, "versions": res})
    print(
        common.table(
            rows,
            [
                "model",
                "rng",
                "revision",
                "commit",
                "rollout ms",
                "outside fwd ms",
                "outside / work",
                "in-run",
                "same trajectories",
            ],
        )
    )
    return common.finish(args, env, {"revisions": commits, "cases": cases}, {})


if __name__ == "__main__":
    common.run_main(main)
