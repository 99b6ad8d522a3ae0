"""Sampler overhead: wall time of a full rollout over the bare backbone forwards it needs.

A masked-diffusion sampler cannot do less than T forward passes of batch 2B (cond and
uncond concatenated for classifier-free guidance). This script

1. samples a batch with the ``confidence`` sampler (one rollout: text encoding, T CFG
   forwards, guidance, sampling, re-masking, log-probs, the trajectory record);
2. replays the recorded states V^(0..T-1) of that same trajectory through
   ``backbone.forward`` with the same [uncond; cond] conditioning of batch 2B: exactly
   T calls with the same inputs, and nothing else (the "floor"), under
   ``torch.inference_mode`` as the sampler runs its own forwards;
3. times both interleaved and prints rollout / floor: the ratio of the medians, the
   median over the rounds of the ratio of the two calls of one round (the figure
   checked against the target, <= 1.05: two adjacent calls see the same load of a
   shared machine), the ratio of the fastest calls, the ratio once the prompt
   encoding (cond and null prompt, timed on its own) is taken out of the rollout, and
   the in-run ratio: a rollout's wall time over the time spent inside its own
   ``backbone.forward`` calls (timed around each call; both in the same time window,
   so it is the figure least moved by other processes; it leaves out any slowdown
   the sampler's work causes to the forwards themselves, e.g. through the caches).

When a ratio is above the target it profiles one rollout (torch.profiler; the backbone
forward, prompt encoding, schedule and trajectory check marked as regions) and prints
where the time outside the forwards goes, and the in-run ratio (wall time of that call
over the time spent inside its own forwards: both measured in the same time window, so
it is the figure least disturbed by other processes on a shared machine).

    python benchmarks/sampler_overhead.py                  # full (CPU, 2 threads)
    python benchmarks/sampler_overhead.py --device cuda
    python benchmarks/sampler_overhead.py --quick --json /tmp/overhead.json
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

import common
import torch

TARGET = "<= 1.05"


def build_backbone(model: str, device: torch.device, quick: bool):
    """The measured backbone: the shapes MDM (shipped architecture, random weights) or
    the tiny aMUSEd of :func:`common.tiny_amused`."""
    if model == "shapes-mdm":
        return common.shapes_backbone(device, grid=8 if quick else None, quick=quick)
    cfg = common.TinyAmusedConfig(grid=8, codebook=64, hidden=32, channels=16, layers=1) if quick else None
    return common.tiny_amused(device, cfg).backbone


def build_case(model: str, backbone, rng: str, batch: int, steps: int) -> dict[str, Any]:
    """Schedule, sampler and prompts of one measured case."""
    from mdmrl_plugins.cogrpo.sampler import ConfidenceOptions, ConfidenceSampler
    from mdmrl_plugins.cogrpo.schedules import AmusedSchedule, MeissonicSchedule

    if model == "shapes-mdm":
        schedule = MeissonicSchedule()
        prompts = common.shapes_prompts(batch)
        rounding = "ceil"
    else:
        schedule = AmusedSchedule()
        prompts = common.amused_prompts(batch)
        rounding = "floor" if rng == "shared" else "ceil"
    sampler = ConfidenceSampler(ConfidenceOptions(rng=rng, rounding=rounding))
    return {
        "backbone": backbone,
        "schedule": schedule,
        "sampler": sampler,
        "prompts": prompts,
        "steps": steps,
    }


def floor_inputs(case: dict[str, Any], traj) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Any]:
    """The T (tokens [2B, N], timestep [2B]) inputs of the trajectory's forwards and the
    [uncond; cond] conditioning [2B], prepared outside the timed region."""
    from mdmrl.trajectory import Conditioning
    from mdmrl_plugins.cogrpo.sampler import masked_fraction

    bb = case["backbone"]
    b = len(case["prompts"])
    with torch.no_grad():
        pair = Conditioning.cat([bb.null_conditioning(b), bb.encode_prompts(case["prompts"])])
    inputs = []
    for t in range(traj.num_steps):
        tok = traj.tokens[:, t]
        doubled = torch.cat([tok, tok]).contiguous()
        inputs.append((doubled, masked_fraction(doubled, bb.mask_token_id)))
    return inputs, pair


#: Regions marked in a profiled rollout: label -> (what is wrapped). Everything else at
#: the top level is the sampler's own per-step math.
REGIONS = ("backbone.forward", "backbone.encode_prompts", "schedule.act", "Trajectory.validate")


def _marked(label: str, fn):
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def profile_rollout(case: dict[str, Any], seeds: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Profile one rollout with torch.profiler. The backbone forward, prompt encoding,
    the schedule's ``act`` and ``Trajectory.validate`` are marked as regions; every
    other top-level torch op is the sampler's own math, grouped by op name; the rest
    of the wall time is Python between ops."""
    from mdmrl.trajectory import Trajectory

    bb, schedule = case["backbone"], case["schedule"]
    validate = Trajectory.validate
    bb.forward = _marked("backbone.forward", bb.forward)
    bb.encode_prompts = _marked("backbone.encode_prompts", bb.encode_prompts)
    schedule.act = _marked("schedule.act", schedule.act)
    Trajectory.validate = _marked("Trajectory.validate", validate)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            common.sync(device)
            t0 = time.perf_counter()
            case["sampler"].sample(bb, schedule, case["prompts"], case["steps"], seeds)
            common.sync(device)
            wall = time.perf_counter() - t0
    finally:
        del bb.forward, bb.encode_prompts, schedule.act
        Trajectory.validate = validate
    by_name: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.cpu_parent is None:
            by_name[ev.name] += ev.cpu_time_total / 1e6
            calls[ev.name] += 1
    regions = {r: {"s": by_name.pop(r, 0.0), "calls": calls.pop(r, 0)} for r in REGIONS}
    ops = sorted(by_name.items(), key=lambda kv: -kv[1])
    math_s = sum(by_name.values())
    marked_s = sum(r["s"] for r in regions.values())
    return {
        "wall_s": wall,
        "in_run_ratio": wall / regions["backbone.forward"]["s"] if regions["backbone.forward"]["s"] else None,
        "regions": regions,
        "forward_s": regions["backbone.forward"]["s"],
        "forward_calls": regions["backbone.forward"]["calls"],
        "sampler_ops_s": math_s,
        "python_between_ops_s": max(0.0, wall - marked_s - math_s),
        "top_ops": [{"op": k, "s": v, "calls": calls[k]} for k, v in ops[:10]],
        "note": "CPU-side times of a profiled run (the profiler adds microseconds per op): read as shares",
    }


def print_profile(name: str, p: dict[str, Any]) -> None:
    wall = p["wall_s"]
    print(f"-- profile of one {name} rollout (wall {wall:.3f} s under the profiler)")
    if p["in_run_ratio"]:
        print(
            f"   in-run ratio, wall / time inside backbone.forward of the same call: {p['in_run_ratio']:.3f}"
        )
    rows = [[r, v["calls"], v["s"] * 1e3, 100 * v["s"] / wall] for r, v in p["regions"].items()]
    rows.append(["sampler math (torch ops)", "", p["sampler_ops_s"] * 1e3, 100 * p["sampler_ops_s"] / wall])
    rows.append(
        ["Python between ops", "", p["python_between_ops_s"] * 1e3, 100 * p["python_between_ops_s"] / wall]
    )
    print(common.table(rows, ["region", "calls", "ms", "% of wall"]))
    rows = [[o["op"], o["calls"], o["s"] * 1e3, 100 * o["s"] / wall] for o in p["top_ops"]]
    print(common.table(rows, ["sampler op", "calls", "ms", "% of wall"]))


MODELS = ("shapes-mdm", "amused-tiny")


def add_rollout_arguments(p) -> None:
    """--batch, --steps and --models: the rollout this script and allocator.py time."""
    p.add_argument(
        "--batch", type=int, default=None, help="B, images per rollout (default 8; 2 with --quick)"
    )
    p.add_argument("--steps", type=int, default=None, help="T (default 16; 4 with --quick)")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))


def models_of(p, args) -> list[str]:
    """The --models list; an unknown name is a one-line usage error."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in models:
        if model not in MODELS:
            p.error(f"--models: unknown model {model!r}; choose {', '.join(MODELS)}")
    return models


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    add_rollout_arguments(p)
    p.add_argument("--rng", default="per_sample,shared", help="comma list of sampler rng modes")
    p.add_argument(
        "--profile",
        choices=["auto", "always", "never"],
        default="auto",
        help="profile a rollout: when above target (auto), always, or never",
    )
    args = p.parse_args(argv)
    device = common.setup(args)
    batch = args.batch or (2 if args.quick else 8)
    steps = args.steps or (4 if args.quick else 16)
    reps = common.repeats(args, 8)
    env = common.environment(device)
    common.header("sampler overhead: full rollout / bare backbone forwards of the same trajectory", device)
    print(
        f"   B={batch}, T={steps}, CFG (one forward of batch 2B per step); median of {reps} interleaved calls"
    )

    cases, profiles, targets, rows = [], {}, {}, []
    for model in models_of(p, args):
        rngs = [r.strip() for r in args.rng.split(",") if r.strip()]
        for rng in rngs:
            if rng not in ("per_sample", "shared"):
                p.error(f"--rng: unknown mode {rng!r}; choose per_sample, shared")
        backbone = build_backbone(model, device, args.quick)
        for rng in rngs:
            case = build_case(model, backbone, rng, batch, steps)
            bb, sampler = case["backbone"], case["sampler"]
            seeds = torch.arange(batch, dtype=torch.long) + 100
            with torch.no_grad():
                traj = sampler.sample(bb, case["schedule"], case["prompts"], steps, seeds)
            inputs, pair = floor_inputs(case, traj)

            inside: list[float] = []  # seconds spent in backbone.forward, per rollout call

            def rollout(case=case, seeds=seeds, inside=inside):
                with common.time_inside(case["backbone"], device) as spent, torch.no_grad():
                    out = case["sampler"].sample(
                        case["backbone"], case["schedule"], case["prompts"], steps, seeds
                    )
                inside.append(spent[0])
                return out

            def floor(bb=bb, inputs=inputs, pair=pair):
                with torch.inference_mode():
                    for tok, ts in inputs:
                        bb(tok, pair, ts)

            def encode(bb=bb, prompts=case["prompts"]):
                with torch.no_grad():
                    bb.encode_prompts(prompts)
                    bb.null_conditioning(len(prompts))

            tm = common.time_interleaved(
                {"rollout": rollout, "floor": floor, "encode": encode}, device, reps, args.warmup
            )
            ratio = tm["rollout"].median / tm["floor"].median
            paired = statistics.median(r / f for r, f in zip(tm["rollout"].times, tm["floor"].times))
            ratio_min = min(tm["rollout"].times) / min(tm["floor"].times)
            in_run = statistics.median(r / f for r, f in zip(tm["rollout"].times, inside[-reps:]))
            ratio_no_text = (tm["rollout"].median - tm["encode"].median) / tm["floor"].median
            per_step_ms = 1e3 * (tm["rollout"].median - tm["floor"].median) / steps
            n, v = bb.num_tokens, bb.codebook_size
            label = f"{model} rng={rng}"
            load = common.load_average()[0]
            rows.append(
                [
                    model,
                    rng,
                    batch,
                    steps,
                    n,
                    v,
                    len(inputs),
                    tm["rollout"].median,
                    tm["floor"].median,
                    ratio,
                    paired,
                    in_run,
                    ratio_min,
                    ratio_no_text,
                    per_step_ms,
                    load,
                ]
            )
            cases.append(
                {
                    "model": model,
                    "rng": rng,
                    "batch": batch,
                    "steps": steps,
                    "tokens": n,
                    "codebook": v,
                    "forward_calls": len(inputs),
                    "forward_batch": 2 * batch,
                    "rollout": tm["rollout"].to_dict(),
                    "floor": tm["floor"].to_dict(),
                    "ratio": ratio,
                    "ratio_paired": paired,
                    "ratio_in_run": in_run,
                    "ratio_of_minima": ratio_min,
                    "encode_prompts": tm["encode"].to_dict(),
                    "ratio_without_prompt_encoding": ratio_no_text,
                    "overhead_ms_per_step": per_step_ms,
                    "load_average_1m": load,
                }
            )
            targets[f"overhead {label}"] = common.target(paired, TARGET)
            if args.profile == "always" or (
                args.profile == "auto" and not targets[f"overhead {label}"]["met"]
            ):
                profiles[label] = profile_rollout(case, seeds, device)
    print(
        common.table(
            rows,
            [
                "model",
                "rng",
                "B",
                "T",
                "N",
                "V",
                "fwd calls",
                "rollout s",
                "floor s",
                "ratio",
                "ratio (paired)",
                "in-run",
                "ratio (min)",
                "ratio w/o text enc",
                "overhead ms/step",
                "load 1m",
            ],
        )
    )
    for label, prof in profiles.items():
        print_profile(label, prof)
    return common.finish(args, env, {"cases": cases, "profiles": profiles}, targets)


if __name__ == "__main__":
    common.run_main(main)
