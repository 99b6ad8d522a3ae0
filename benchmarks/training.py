"""Training cost: log-prob replay against a plain forward+backward, the timestep
fraction, and background rewards.

1. Replay: one trained step recomputes log pi_model,t of the filled tokens with
   ``sampler.replay_step`` and back-propagates it. Under CFG that needs the cond and
   the uncond forward, which the sampler runs as ONE forward of batch 2B. The
   denominator is therefore one plain ``backbone.forward`` + ``backward`` of batch 2B
   on the same states and conditioning (loss = mean of the logits): the least any
   CFG log-prob update can do. Target: replay / plain(2B) <= 1.3. The ratio to a
   plain forward+backward of batch B (no CFG) is printed too; it is about 2 by
   construction. Conditioning is encoded once, outside the timed region, for both.
2. ``train.timestep_fraction``: the engine's ``Trainer.update`` on one rollout batch
   with fractions 1.0, 0.5 and 0.25; the update time should fall in proportion.
3. ``train.background_rewards``: ``Trainer.rollout`` with rollout chunks and a reward
   whose cost is set (the shapes alignment reward padded to a fixed time per chunk,
   by sleeping -- a reward model on another device -- or by busy CPU work -- a reward
   model competing for this machine's cores). Sequential costs about rollout +
   reward; background should cost about max(rollout, reward) plus one chunk's
   reward (the last chunk cannot overlap): ideal = max(R, W) + min(R, W) / chunks.

    python benchmarks/training.py
    python benchmarks/training.py --device cuda
    python benchmarks/training.py --quick --json /tmp/training.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch

TARGET_REPLAY = "<= 1.3"


# --------------------------------------------------------------------------- 1. replay


def replay_case(
    model: str, device: torch.device, quick: bool, batch: int, steps: int, reps: int, warmup: int
):
    """Time replay_step fwd+bwd against plain fwd+bwd at 2B and at B."""
    from mdmrl.trajectory import Conditioning
    from mdmrl_plugins.cogrpo.sampler import ConfidenceSampler, masked_fraction
    from mdmrl_plugins.cogrpo.schedules import AmusedSchedule, MeissonicSchedule

    if model == "shapes-mdm":
        bb = common.shapes_backbone(device, grid=8 if quick else None, quick=quick)
        schedule, prompts = MeissonicSchedule(), common.shapes_prompts(batch)
    else:
        cfg = (
            common.TinyAmusedConfig(grid=8, codebook=64, hidden=32, channels=16, layers=1) if quick else None
        )
        bb = common.tiny_amused(device, cfg).backbone
        schedule, prompts = AmusedSchedule(), common.amused_prompts(batch)
    sampler = ConfidenceSampler()
    with torch.no_grad():
        traj = sampler.sample(bb, schedule, prompts, steps, torch.arange(batch) + 100)
        cond = bb.encode_prompts(prompts)
        uncond = bb.null_conditioning(batch)
    bb.train()
    step = steps // 2
    tok = traj.tokens[:, step].to(device)
    ts = masked_fraction(tok, bb.mask_token_id)
    pair = Conditioning.cat([uncond, cond])
    tok2, ts2 = torch.cat([tok, tok]), torch.cat([ts, ts])

    def replay():
        bb.zero_grad(set_to_none=True)
        rep = sampler.replay_step(bb, traj, step, cond, uncond)
        rep.model_log_prob.sum().backward()

    def plain_2b():
        bb.zero_grad(set_to_none=True)
        bb(tok2, pair, ts2).logits.mean().backward()

    def plain_b():
        bb.zero_grad(set_to_none=True)
        bb(tok, cond, ts).logits.mean().backward()

    tm = common.time_interleaved(
        {"replay": replay, "plain_2b": plain_2b, "plain_b": plain_b}, device, reps, warmup
    )
    bb.zero_grad(set_to_none=True)
    return {
        "model": model,
        "batch": batch,
        "tokens": bb.num_tokens,
        "codebook": bb.codebook_size,
        "replay": tm["replay"].to_dict(),
        "plain_fwd_bwd_2B": tm["plain_2b"].to_dict(),
        "plain_fwd_bwd_B": tm["plain_b"].to_dict(),
        "ratio_vs_plain_2B": tm["replay"].median / tm["plain_2b"].median,
        "ratio_vs_plain_B": tm["replay"].median / tm["plain_b"].median,
        "ratio_vs_plain_2B_of_minima": min(tm["replay"].times) / min(tm["plain_2b"].times),
        "load_average_1m": common.load_average()[0],
    }


# --------------------------------------------------------------------------- engine helpers


def shapes_recipe(
    device: torch.device,
    quick: bool,
    batch: int,
    group: int,
    steps: int,
    rollout_batch: int,
    background: bool,
) -> dict[str, Any]:
    """A naive-GRPO recipe on a random-weight shapes-mdm (shipped architecture; a
    narrow one with --quick) with a fixed schedule."""
    arch = common.shapes_arch(quick)
    return {
        "seed": 0,
        "device": device.type,
        "backbone": {"name": "shapes-mdm", "options": {"weights": "random", **arch}},
        "schedule": {"name": "meissonic"},
        "sampler": {"name": "confidence", "steps": steps},
        "rewards": [{"name": "shapes-alignment", "weight": 1.0}],
        "objective": {"name": "grpo"},
        "prompts": {"train": {"name": "shapes-train"}},
        "train": {
            "mode": "naive",
            "iterations": 1,
            "term_chunk": 4,
            "rollout_batch": rollout_batch,
            "background_rewards": background,
            "model": {"lr": 1e-5, "group_size": group, "batch_size": batch},
        },
        "logging": {"tensorboard": False, "image_every": 0},
    }


def make_trainer(raw: dict[str, Any], device: torch.device, run_dir: Path, parts=None):
    """Validate ``raw`` and build a Trainer (reusing ``parts`` when given)."""
    from mdmrl.build import build_parts
    from mdmrl.engine import Trainer
    from mdmrl.recipe import validate

    loaded = validate(raw)
    parts = parts or build_parts(loaded, device)
    return Trainer(loaded, parts, run_dir, device, log=lambda s: None), parts


# --------------------------------------------------------------------------- 2. fraction


def fraction_case(device, quick, batch, group, steps, reps, warmup, run_dir: Path) -> dict[str, Any]:
    """Time Trainer.update on one rollout batch at timestep_fraction 1, 0.5, 0.25."""
    from mdmrl.advantages import group_advantages

    raw = shapes_recipe(device, quick, batch, group, steps, batch, background=False)
    tr, _ = make_trainer(raw, device, run_dir)
    tr.parts.backbone.train()
    traj, total, _, _, local, group_ids = tr.rollout("model")
    adv = group_advantages(total, group_ids)
    fractions = (1.0, 0.5, 0.25)

    def update_at(f: float):
        def run():
            tr.recipe.train.timestep_fraction = f
            tr.update("model", traj, adv, local)

        return run

    tm = common.time_interleaved({f"{f}": update_at(f) for f in fractions}, device, reps, warmup)
    tr.worker.close()
    full = tm["1.0"].median
    rows = []
    for f in fractions:
        terms = max(1, round(f * steps))
        rows.append(
            {
                "fraction": f,
                "terms": terms,
                "update": tm[f"{f}"].to_dict(),
                "relative_time": tm[f"{f}"].median / full,
                "relative_time_of_minima": min(tm[f"{f}"].times) / min(tm["1.0"].times),
                "relative_terms": terms / steps,
            }
        )
    return {
        "batch": batch,
        "steps": steps,
        "term_chunk": 4,
        "rows": rows,
        "load_average_1m": common.load_average()[0],
    }


# --------------------------------------------------------------------------- 3. background


class PaddedReward:
    """Wraps a rewarder so that every ``score`` call takes at least ``seconds``: the
    remainder is slept (``kind = "sleep"``) or spent in CPU matrix products
    (``kind = "compute"``). Scores are the wrapped rewarder's."""

    def __init__(self, inner, seconds: float, kind: str):
        self.inner, self.seconds, self.kind = inner, seconds, kind
        self.name = f"padded-{inner.name}"

    def score(self, batch):
        t0 = time.perf_counter()
        out = self.inner.score(batch)
        if self.kind == "sleep":
            time.sleep(max(0.0, self.seconds - (time.perf_counter() - t0)))
        else:
            a = torch.randn(192, 192)
            while time.perf_counter() - t0 < self.seconds:
                a = torch.tanh(a @ a)
        return out


def background_case(device, quick, batch, group, steps, chunk, factor, kinds, reps, warmup, run_dir: Path):
    """Trainer.rollout with a padded reward, background_rewards false vs true."""
    from mdmrl.rewarding import CompositeRewarder
    from mdmrl_plugins.shapes.rewards import ShapesAlignment

    n_chunks = -(-batch // chunk)
    raw_seq = shapes_recipe(device, quick, batch, group, steps, chunk, background=False)
    raw_bg = shapes_recipe(device, quick, batch, group, steps, chunk, background=True)
    free, parts = make_trainer(raw_seq, device, run_dir)
    # calibration: the rollout alone (the plain shapes reward takes a few milliseconds);
    # the padded reward then costs `factor` times that, spread over the chunks
    r_cal = common.time_one(lambda: free.rollout("model"), device, 1, warmup).median
    out = {"batch": batch, "chunk": chunk, "chunks": n_chunks, "steps": steps, "calibration_rollout_s": r_cal}
    out["kinds"] = {}
    for kind in kinds:
        per_chunk = factor * r_cal / n_chunks
        parts.rewarder = CompositeRewarder(
            [("padded", 1.0, PaddedReward(ShapesAlignment(), per_chunk, kind))]
        )
        seq, _ = make_trainer(raw_seq, device, run_dir, parts)
        bg, _ = make_trainer(raw_bg, device, run_dir, parts)
        # R is re-measured interleaved with the two modes, so all three see the same load
        tm = common.time_interleaved(
            {
                "rollout_only": lambda f=free: f.rollout("model"),
                "sequential": lambda s=seq: s.rollout("model"),
                "background": lambda b=bg: b.rollout("model"),
            },
            device,
            reps,
            warmup,
        )
        seq.worker.close()
        bg.worker.close()
        r_time = tm["rollout_only"].median
        w_time = per_chunk * n_chunks
        ideal = max(r_time, w_time) + min(r_time, w_time) / n_chunks
        out["kinds"][kind] = {
            "reward_per_chunk_s": per_chunk,
            "rollout_s": r_time,
            "reward_s": w_time,
            "sum_s": r_time + w_time,
            "max_s": max(r_time, w_time),
            "ideal_overlap_s": ideal,
            "rollout_only": tm["rollout_only"].to_dict(),
            "sequential": tm["sequential"].to_dict(),
            "background": tm["background"].to_dict(),
            "background_over_sequential": tm["background"].median / tm["sequential"].median,
            "background_over_max": tm["background"].median / max(r_time, w_time),
            "background_over_ideal": tm["background"].median / ideal,
            "load_average_1m": common.load_average()[0],
        }
    free.worker.close()
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="training batch B (default 8; 4 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="T (default 16; 4 with --quick)")
    p.add_argument("--group", type=int, default=4, help="GRPO group size G for the engine parts (default 4)")
    p.add_argument("--chunk", type=int, default=None, help="train.rollout_batch for part 3 (default B/4)")
    p.add_argument(
        "--reward-factor",
        type=float,
        default=1.0,
        help="reward cost W as a multiple of the rollout time R in part 3 (default 1)",
    )
    p.add_argument("--reward-kinds", default="sleep,compute", help="comma list of sleep, compute (part 3)")
    p.add_argument("--models", default="shapes-mdm,amused-tiny", help="models of part 1")
    p.add_argument("--parts", default="replay,fraction,background", help="which parts to run")
    args = p.parse_args(argv)
    device = common.setup(args)
    batch = args.batch or (4 if args.quick else 8)
    steps = args.steps or (4 if args.quick else 16)
    group = min(args.group, batch)
    chunk = args.chunk or max(1, batch // 4)
    reps = common.repeats(args, 3)
    parts = {x.strip() for x in args.parts.split(",")}
    env = common.environment(device)
    results: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    common.header("training cost", device)

    if "replay" in parts:
        print(f"-- 1. replay_step fwd+bwd vs plain backbone fwd+bwd (B={batch}, T={steps}, median of {reps})")
        print("   denominator: one backbone.forward + backward of batch 2B ([uncond; cond], the CFG pair the")
        print("   replay must run), same states and conditioning, loss = mean(logits)")
        rows, cases = [], []
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            c = replay_case(model, device, args.quick, batch, steps, reps, args.warmup)
            cases.append(c)
            rows.append(
                [
                    model,
                    batch,
                    c["tokens"],
                    c["codebook"],
                    c["replay"]["median_s"],
                    c["plain_fwd_bwd_2B"]["median_s"],
                    c["plain_fwd_bwd_B"]["median_s"],
                    c["ratio_vs_plain_2B"],
                    c["ratio_vs_plain_2B_of_minima"],
                    c["ratio_vs_plain_B"],
                    c["load_average_1m"],
                ]
            )
            targets[f"replay / plain fwd+bwd(2B), {model}"] = common.target(
                c["ratio_vs_plain_2B"], TARGET_REPLAY
            )
        print(
            common.table(
                rows,
                [
                    "model",
                    "B",
                    "N",
                    "V",
                    "replay s",
                    "plain(2B) s",
                    "plain(B) s",
                    "replay/plain(2B)",
                    "same, of minima",
                    "replay/plain(B)",
                    "load 1m",
                ],
            )
        )
        results["replay"] = cases

    with tempfile.TemporaryDirectory() as tmp:
        if "fraction" in parts:
            print(
                f"-- 2. Trainer.update vs train.timestep_fraction (shapes-mdm, B={batch}, T={steps}, "
                f"term_chunk 4, median of {reps})"
            )
            fr = fraction_case(device, args.quick, batch, group, steps, reps, args.warmup, Path(tmp))
            rows = [
                [
                    r["fraction"],
                    r["terms"],
                    r["update"]["median_s"],
                    r["relative_time"],
                    r["relative_time_of_minima"],
                    r["relative_terms"],
                ]
                for r in fr["rows"]
            ]
            print(
                common.table(
                    rows,
                    [
                        "timestep_fraction",
                        "terms",
                        "update s",
                        "time / time(1.0)",
                        "same, of minima",
                        "terms / T",
                    ],
                )
            )
            print(f"   {common.load_note()}")
            results["timestep_fraction"] = fr
            for r in fr["rows"][1:]:
                targets[f"update time(f={r['fraction']}) / (f x time(1.0))"] = common.target(
                    r["relative_time"] / r["relative_terms"], "<= 1.15"
                )

        if "background" in parts:
            kinds = [k.strip() for k in args.reward_kinds.split(",") if k.strip()]
            for k in kinds:
                if k not in ("sleep", "compute"):
                    p.error(f"--reward-kinds: unknown kind {k!r}; choose sleep, compute")
            n_chunks = -(-batch // chunk)
            print(
                f"-- 3. rollout + reward, train.background_rewards false vs true (shapes-mdm, B={batch}, "
                f"rollout_batch {chunk} = {n_chunks} chunks, T={steps}, reward W = {args.reward_factor} x R)"
            )
            bgc = background_case(
                device,
                args.quick,
                batch,
                group,
                steps,
                chunk,
                args.reward_factor,
                kinds,
                reps,
                args.warmup,
                Path(tmp),
            )
            rows = []
            for kind, k in bgc["kinds"].items():
                rows.append(
                    [
                        kind,
                        k["rollout_s"],
                        k["reward_s"],
                        k["sum_s"],
                        k["max_s"],
                        k["ideal_overlap_s"],
                        k["sequential"]["median_s"],
                        k["background"]["median_s"],
                        k["background_over_sequential"],
                        k["background_over_max"],
                        k["load_average_1m"],
                    ]
                )
                targets[f"background rollout+reward / max(R, W) [{kind} reward]"] = common.target(
                    k["background_over_max"], f"<= {1 + 1 / n_chunks + 0.1:.2f}"
                )
            print(
                common.table(
                    rows,
                    [
                        "reward",
                        "R s",
                        "W s",
                        "R+W s",
                        "max s",
                        "ideal s",
                        "sequential s",
                        "background s",
                        "bg / seq",
                        "bg / max",
                        "load 1m",
                    ],
                )
            )
            print("   ideal = max(R, W) + min(R, W) / chunks (the last chunk's reward cannot overlap)")
            results["background_rewards"] = bgc
    return common.finish(args, env, results, targets)


if __name__ == "__main__":
    common.run_main(main)
