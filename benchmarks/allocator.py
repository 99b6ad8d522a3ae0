"""Rollout and forward time with glibc's default malloc settings vs mdmrl's, side by side.

``mdmrl`` (and every benchmark script) calls :func:`mdmrl.hostmem.keep_freed_memory`
at start: freed tensor memory stays in the process instead of being returned to the
system and faulted in again. A malloc setting cannot be undone inside a process, so
this script alternates child processes (default, kept, default, kept, ...), each
timing, on the same random-weight model, prompts and seeds:

- ``rollout``: one full ``confidence`` rollout (as sampler_overhead.py);
- ``floor``: the bare backbone forwards of that trajectory (batch 2B, T calls);
- the minor page faults of one rollout.

It prints the median over rounds of each figure per setting, and default / kept (the
speed-up; above 1 means the setting helps).

    python benchmarks/allocator.py
    python benchmarks/allocator.py --device cuda
    python benchmarks/allocator.py --quick --json /tmp/allocator.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import common
import torch
from sampler_overhead import add_rollout_arguments, build_backbone, build_case, floor_inputs, models_of

SETTINGS = {"default": "0", "kept": "1"}


def child(
    model: str, batch: int, steps: int, repeats: int, device: torch.device, quick: bool
) -> dict[str, Any]:
    """Time ``repeats`` rollouts and floors in this process; returns their medians."""
    case = build_case(model, build_backbone(model, device, quick), "per_sample", batch, steps)
    bb, seeds = case["backbone"], torch.arange(batch, dtype=torch.long) + 100

    def rollout():
        with torch.no_grad():
            return case["sampler"].sample(bb, case["schedule"], case["prompts"], steps, seeds)

    inputs, pair = floor_inputs(case, rollout())

    def floor():
        with torch.inference_mode():
            for tok, ts in inputs:
                bb(tok, pair, ts)

    faults = []

    def counted():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        rollout()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

    tm = common.time_interleaved({"rollout": counted, "floor": floor}, device, repeats, 1)
    return {
        "rollout_s": tm["rollout"].median,
        "floor_s": tm["floor"].median,
        "faults": statistics.median(faults[-repeats:]),
        "malloc": common.MALLOC,
    }


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    add_rollout_arguments(p)
    p.add_argument(
        "--rounds", type=int, default=None, help="child processes per setting (default 4; 1 with --quick)"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one child: MODEL, JSON on stdout
    args = p.parse_args(argv)
    device = common.setup(args)
    batch = args.batch or (2 if args.quick else 8)
    steps = args.steps or (4 if args.quick else 16)
    reps = common.repeats(args, 5)
    if args.child:
        print(json.dumps(child(args.child, batch, steps, reps, device, args.quick)))
        return {}
    rounds = args.rounds or (1 if args.quick else 4)
    env = common.environment(device)
    common.header("glibc malloc defaults vs freed memory kept (mdmrl/hostmem.py), child processes", device)
    print(
        f"   B={batch}, T={steps}; {rounds} alternated child processes per setting, each the median of {reps} calls"
    )
    results: dict[str, Any] = {}
    rows, targets = [], {}
    for model in models_of(p, args):
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SETTINGS}
        for _ in range(rounds):
            for name, flag in SETTINGS.items():
                runs[name].append(_spawn(args, model, batch, steps, reps, flag))
        med = {
            name: {k: statistics.median(r[k] for r in rs) for k in ("rollout_s", "floor_s", "faults")}
            for name, rs in runs.items()
        }
        speedup = {k: med["default"][k] / med["kept"][k] for k in ("rollout_s", "floor_s")}
        load = common.load_average()[0]
        for name in SETTINGS:
            m = med[name]
            rows.append([model, name, m["rollout_s"], m["floor_s"], m["faults"], load])
        rows.append([model, "default / kept", speedup["rollout_s"], speedup["floor_s"], "", ""])
        results[model] = {"runs": runs, "median": med, "speedup": speedup, "load_average_1m": load}
        targets[f"rollout speed-up {model}"] = common.target(speedup["rollout_s"], ">= 1")
    print(common.table(rows, ["model", "malloc", "rollout s", "floor s", "faults / rollout", "load 1m"]))
    return common.finish(args, env, results, targets)


def _spawn(args, model: str, batch: int, steps: int, reps: int, flag: str) -> dict[str, Any]:
    """One child process with MDMRL_KEEP_FREED_MEMORY=flag; its JSON line."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        model,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    cmd += ["--batch", str(batch), "--steps", str(steps), "--repeats", str(reps)] + (
        ["--quick"] if args.quick else []
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["MDMRL_KEEP_FREED_MEMORY"] = flag
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"allocator child ({model}, MDMRL_KEEP_FREED_MEMORY={flag}) failed:\n{out.stderr[-2000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["process_s"] = time.perf_counter() - t0
    return rec


if __name__ == "__main__":
    common.run_main(main)
