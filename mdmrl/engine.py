"""The training engine: rollouts, rewards, group advantages, phased updates,
checkpoints and metrics. Algorithm-specific math lives in the plug-ins (samplers,
schedule policies, objectives); this module only orchestrates them.

One iteration (Co-GRPO, Fig. 3): draw prompts, repeat each G times, sample the
trajectories with the current backbone and schedule policy, score them, normalise
rewards within each group (advantages), then update the parameters of the
iteration's phase ("model", "schedule" or "joint"; Eq. 21) with the objective.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mdmrl import checkpoint as ckpt
from mdmrl.advantages import group_advantages
from mdmrl.build import Parts
from mdmrl.distributed import Dist, setup
from mdmrl.errors import UserError
from mdmrl.interfaces import GeneratedBatch, Policies
from mdmrl.recipe import LoadedRecipe, TrainSpec, resolved_dict
from mdmrl.rewarding import RewardProcessError, start_scoring
from mdmrl.rundir import MetricsLog
from mdmrl.trajectory import ACTION_FIELDS, LossOutput, Trajectory

STREAMS = ("prompts", "seeds", "update")


def phase_plan(t: TrainSpec) -> list[tuple[str, int]]:
    """(phase, cycle) for every iteration of the run, in order (Eq. 21)."""
    if t.mode == "naive":
        return [("model", 0)] * t.iterations
    if t.mode == "schedule_only":
        return [("schedule", 0)] * t.iterations
    if t.mode == "joint":
        return [("joint", 0)] * t.iterations
    plan: list[tuple[str, int]] = []
    for c in range(t.cycles):
        model = [("model", c)] * t.model_iterations
        sched = [("schedule", c)] * t.schedule_iterations
        plan += (sched + model) if t.schedule_first else (model + sched)
    return plan


def stream_seed(seed: int, stream: str) -> int:
    """Independent, documented seeds for the run's random streams."""
    return (seed * 1_000_003 + (STREAMS.index(stream) + 1) * 7919) % (2**63 - 1)


def kl_steps(num_steps: int, per_measurement: int, measurement: int) -> list[int]:
    """The steps the KL monitor replays at its ``measurement``-th measurement: every
    step when ``per_measurement`` is 0 or >= T, else ``per_measurement`` steps spread
    evenly over [0, T) and shifted by one from one measurement to the next, so that
    T consecutive measurements replay every step equally often when it divides T."""
    if per_measurement == 0 or per_measurement >= num_steps:
        return list(range(num_steps))
    stride = num_steps / per_measurement
    return sorted({(measurement + int(j * stride)) % num_steps for j in range(per_measurement)})


def _chunks(seq: list, size: int) -> list[list]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


@dataclass
class StopRequest:
    requested: bool = False


class TrainStep(torch.nn.Module):
    """The trained modules (backbone and schedule policy) under one module whose
    forward is the objective's loss, so that the accelerator's wrapper (DDP, FSDP,
    DeepSpeed) sees every forward and synchronises the gradients of both, whichever
    phase trains. The frozen reference is not a child: it is neither wrapped nor
    synchronised."""

    def __init__(self, parts: Parts, reference: torch.nn.Module | None):
        super().__init__()
        self.backbone = parts.backbone
        self.schedule = parts.schedule
        # a tuple, so that none of them is registered as a child module
        self._others = (parts.sampler, parts.objective, reference)

    def forward(self, phase: str, sub: Trajectory, adv: torch.Tensor, terms: list[int]) -> LossOutput:
        with torch.set_grad_enabled(phase in ("model", "joint")):  # a trainable text encoder
            cond = self.backbone.encode_prompts(sub.prompts)
            uncond = self.backbone.null_conditioning(sub.batch_size)
        sampler, objective, reference = self._others
        pol = Policies(self.backbone, self.schedule, sampler, cond, uncond, reference)
        return objective.loss(pol, sub, adv, terms, phase)


class Trainer:
    def __init__(
        self,
        loaded: LoadedRecipe,
        parts: Parts,
        run_dir: Path,
        device: torch.device,
        dist: Dist | None = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    ):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.parts = parts
        self.run_dir = run_dir
        self.device = device
        t = self.recipe.train
        self.dist = dist or setup(t.mixed_precision, device)
        self.accelerator = self.dist.accelerator
        self.log = log
        self.plan = phase_plan(t)
        phases = {p for p, _ in self.plan}
        self.model_params = [p for p in parts.backbone.parameters() if p.requires_grad]
        self.schedule_params = [p for p in parts.schedule.parameters() if p.requires_grad]
        self.opt_model = self._optimizer(self.model_params, t.model) if phases & {"model", "joint"} else None
        self.opt_schedule = (
            self._optimizer(self.schedule_params, t.schedule) if phases & {"schedule", "joint"} else None
        )
        if phases & {"schedule", "joint"} and not self.schedule_params:
            raise UserError(
                f"train.mode: {t.mode!r} trains the schedule, but schedule {self.recipe.schedule.name!r} "
                'has no trainable parameters; use mode = "naive" or a learned schedule such as "gaussian"'
            )
        kl_beta = float(getattr(loaded.part_options.get("objective"), "kl_beta", 0.0) or 0.0)
        self.reference = None
        if kl_beta > 0 or self.recipe.logging.kl_every > 0:
            # The frozen initial model: the KL penalty's reference and the monitor's.
            self.reference = copy.deepcopy(parts.backbone).eval().requires_grad_(False)
        smallest = min(o.batch_size for o in (t.model, t.schedule))
        if smallest < self.dist.world_size:
            raise UserError(
                f"train: a batch of {smallest} trajectories cannot be shared by {self.dist.world_size} "
                "processes; use a batch_size of at least the number of processes"
            )
        if self.dist.engine == "DEEPSPEED" and self.opt_model and self.opt_schedule:
            raise UserError(
                f"train.mode: {t.mode!r} trains the model and the schedule with one optimizer each; "
                'DeepSpeed takes one model with one optimizer: use mode = "naive" or an FSDP/DDP config'
            )
        # The accelerator wraps the trained modules and their optimizers (DDP, FSDP or
        # DeepSpeed under a multi-process launch; unchanged in one process).
        prepared = self.accelerator.prepare(
            TrainStep(parts, self.reference), *[o for o in (self.opt_model, self.opt_schedule) if o]
        )
        prepared = list(prepared) if isinstance(prepared, (tuple, list)) else [prepared]
        self.train_step = prepared.pop(0)
        self.opt_model = prepared.pop(0) if self.opt_model else None
        self.opt_schedule = prepared.pop(0) if self.opt_schedule else None
        if self.dist.engine == "FSDP":
            # Rollouts call the backbone's blocks before any forward of the wrapper; FSDP
            # would take the first block so called for the root of the tree. Make the
            # wrapper the root now, as its first forward would.
            from torch.distributed.fsdp import fully_shard

            fully_shard.state(self.train_step)._lazy_init()
        # FSDP replaces the modules' parameters by sharded ones: clip those
        self.model_params = [p for p in parts.backbone.parameters() if p.requires_grad]
        self.schedule_params = [p for p in parts.schedule.parameters() if p.requires_grad]
        self.gens = {s: torch.Generator().manual_seed(stream_seed(self.recipe.seed, s)) for s in STREAMS}
        torch.manual_seed(self.recipe.seed)
        self.iteration = 0
        self.bad_in_row = 0
        self.bad_total = 0
        self.stop = StopRequest()
        # Where the rewarders run (reward_placement): the scorer of rollouts, and what the
        # main process's evaluations score with (the reward process's client, in mode process).
        self.worker = start_scoring(loaded, parts.rewarder, self.dist, t.background_rewards)
        parts.rewarder = self.worker.rewarder
        self.checkpointed_at: int | None = None  # the iteration of the last checkpoint saved or read
        self.metrics: MetricsLog | None = None

    @staticmethod
    def _optimizer(params: list, o) -> torch.optim.Optimizer | None:
        if not params:
            return None
        return torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps
        )

    # -- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        sharded = self.dist.sharded  # optimizer states are in the checkpoint's sharded/ folder
        return {
            "optim_model": self.opt_model.state_dict() if self.opt_model and not sharded else {},
            "optim_schedule": self.opt_schedule.state_dict() if self.opt_schedule and not sharded else {},
            "rng": {s: g.get_state() for s, g in self.gens.items()},
            "torch_rng": torch.get_rng_state(),
        }

    def meta(self) -> dict[str, Any]:
        phase, cycle = self.plan[self.iteration - 1] if self.iteration else ("", 0)
        return {
            "iteration": self.iteration,
            "last_phase": phase,
            "last_cycle": cycle,
            "total_iterations": len(self.plan),
            "bad_in_row": self.bad_in_row,
            "bad_total": self.bad_total,
            "recipe_digest": recipe_digest(self.loaded),
        }

    @contextmanager
    def full_parameters(self):
        """The trained modules' whole parameters on every rank, for work outside the
        wrapped forward (rollouts, evaluation, images, whole-weight checkpoints): FSDP
        keeps them sharded between forwards (DeepSpeed ZeRO-3 partitions them). Collective:
        every rank enters it. Nothing to do in one process or under DDP."""
        units = []
        if self.dist.engine == "DEEPSPEED":
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.train_step.parameters()), modifier_rank=None):
                yield
            return
        if self.dist.engine == "FSDP":
            from torch.distributed.fsdp import FSDPModule

            units = [m for m in self.train_step.modules() if isinstance(m, FSDPModule)]
        # Blocks called inside stay gathered: resharding after each call would all-gather
        # again at the next, a collective that ranks sampling different numbers of
        # chunks (or the main process evaluating alone) would not match.
        after = getattr(self.accelerator.state.fsdp_plugin, "reshard_after_forward", True) if units else True
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(bool(after), recurse=False)

    @contextmanager
    def _local_gradients(self):
        """A backward pass whose gradients stay on this rank, accumulated until the last
        pass of the optimizer step: ``no_sync`` for DDP and FSDP; DeepSpeed's engine
        reads the accelerator's sync flag instead (it would step otherwise)."""
        state = self.accelerator.gradient_state
        state._set_sync_gradients(False)
        try:
            with self.accelerator.no_sync(self.train_step):
                yield
        finally:
            state._set_sync_gradients(True)

    def _optimizers(self) -> dict[str, Any]:
        return {k: o for k, o in (("model", self.opt_model), ("schedule", self.opt_schedule)) if o}

    def save_checkpoint(self) -> Path | None:
        """Write checkpoint ``iter_<iteration>``: whole trainable weights (safetensors),
        optimizer and RNG states, metadata. Under FSDP every rank also writes its shards
        of the model and of each optimizer that has state into ``sharded/``
        (torch.distributed.checkpoint), which a resume reads back."""
        lg = self.recipe.logging
        root = self.run_dir / "checkpoints"
        self.checkpointed_at = self.iteration
        if not self.dist.sharded:
            if not self.dist.is_main:
                return None
            return ckpt.save(
                root,
                self.iteration,
                self.parts.backbone,
                self.parts.schedule,
                self.state(),
                self.meta(),
                keep=lg.keep_checkpoints,
            )
        staging = ckpt.staging(root, self.iteration, create=self.dist.is_main)
        self.dist.barrier()
        saved = self._save_shards(staging / ckpt.SHARDED)
        final = None
        with self.full_parameters():
            if self.dist.is_main:
                final = ckpt.save(
                    root,
                    self.iteration,
                    self.parts.backbone,
                    self.parts.schedule,
                    self.state(),
                    {**self.meta(), "sharded_optimizers": saved},
                    keep=lg.keep_checkpoints,
                    staging=staging,
                )
            self.dist.barrier()
        return final

    def _save_shards(self, folder: Path) -> list[str]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        if self.dist.engine == "DEEPSPEED":  # one model, one optimizer: accelerate's own format
            self.accelerator.save_state(str(folder))
            return sorted(self._optimizers())
        # an optimizer that has not stepped yet has no state; asking torch for its state
        # dict would initialise it (one silent step), so it is left out
        opts = {k: o.optimizer for k, o in self._optimizers().items() if o.optimizer.state}
        sd = {"model": get_model_state_dict(self.train_step)}
        sd.update({f"optim_{k}": get_optimizer_state_dict(self.train_step, o) for k, o in opts.items()})
        dcp.save(sd, checkpoint_id=str(folder))
        return sorted(opts)

    def _load_shards(self, folder: Path, names: list[str]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if self.dist.engine == "DEEPSPEED":
            self.accelerator.load_state(str(folder))
            return
        opts = {k: o.optimizer for k, o in self._optimizers().items() if k in names}
        sd = {"model": get_model_state_dict(self.train_step)}
        sd.update({f"optim_{k}": get_optimizer_state_dict(self.train_step, o) for k, o in opts.items()})
        dcp.load(sd, checkpoint_id=str(folder))
        set_model_state_dict(self.train_step, sd["model"])
        for k, o in opts.items():
            set_optimizer_state_dict(self.train_step, o, sd[f"optim_{k}"])

    def restore(self, path: Path) -> None:
        sharded = self.dist.sharded
        if sharded:
            state, meta = ckpt.read(path)
        else:
            state, meta = ckpt.load(path, self.parts.backbone, self.parts.schedule)
        if meta.get("recipe_digest") != recipe_digest(self.loaded):
            raise UserError(
                f"{path}: checkpoint was written by a different recipe than {self.run_dir}/recipe.toml"
            )
        if sharded and not (path / ckpt.SHARDED).is_dir():
            raise UserError(f"{path}: has no {ckpt.SHARDED}/ folder; it was not written by a sharded run")
        try:
            if sharded:
                self._load_shards(path / ckpt.SHARDED, meta.get("sharded_optimizers", []))
            else:
                if self.opt_model:
                    self.opt_model.load_state_dict(state["optim_model"])
                if self.opt_schedule:
                    self.opt_schedule.load_state_dict(state["optim_schedule"])
            for s, g in self.gens.items():
                g.set_state(state["rng"][s])
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise UserError(f"{path}/state.pt: does not match this run ({exc})") from None
        self.iteration = int(meta["iteration"])
        self.checkpointed_at = self.iteration
        self.bad_in_row = int(meta.get("bad_in_row", 0))
        self.bad_total = int(meta.get("bad_total", 0))

    # -- one iteration -------------------------------------------------------------
    def _autocast(self):
        return self.accelerator.autocast()

    def rollout(self, phase: str) -> tuple[Trajectory, torch.Tensor, dict, dict, torch.Tensor, torch.Tensor]:
        """Sample this rank's share of the iteration's batch and score it.

        Returns (local trajectories, global total rewards float64 [B], global reward
        components, timings, local indices, group ids [B])."""
        r, t = self.recipe, self.recipe.train
        o = t.model if phase in ("model", "joint") else t.schedule
        g = o.group_size
        n_prompts = o.batch_size // g
        prompts = self.parts.train_prompts.sample(n_prompts, self.gens["prompts"])
        all_prompts = [p for p in prompts for _ in range(g)]
        b = len(all_prompts)
        group_ids = torch.arange(n_prompts).repeat_interleave(g)
        seeds = torch.randint(0, 2**31 - 1, (b,), generator=self.gens["seeds"])
        local = self.dist.local_indices(b)
        trajs, futures = [], []
        bb, sch = self.parts.backbone, self.parts.schedule
        t_sample = t_reward = 0.0
        with self.full_parameters():  # sampling calls the modules outside the wrapper
            for idx in _chunks(local.tolist(), t.rollout_batch):
                ix = torch.tensor(idx, dtype=torch.long)
                t0 = time.perf_counter()
                with torch.no_grad(), self._autocast():
                    traj = self.parts.sampler.sample(
                        bb, sch, [all_prompts[i] for i in idx], r.sampler.steps, seeds[ix], group_ids[ix]
                    )
                t1 = time.perf_counter()
                trajs.append(traj)
                futures.append(
                    self.worker.submit(
                        GeneratedBatch(traj.prompts, traj.final_tokens, bb.grid_shape, bb.decode)
                    )
                )
                t_sample += t1 - t0
                t_reward += time.perf_counter() - t1
            wait_start = time.perf_counter()
            # background scoring decodes with the model; placement "device" decodes and
            # scores here; a failure to score on any process stops every process
            total, comps = self.worker.collect(futures, local, all_prompts)
            t_wait = time.perf_counter() - wait_start
        traj = Trajectory.cat(trajs) if len(trajs) > 1 else trajs[0]
        # time_reward: scoring in line plus waiting for background scoring after the rollout.
        timing = {"time_rollout": t_sample, "time_reward": t_reward + t_wait, "time_reward_wait": t_wait}
        return traj, total, comps, timing, local, group_ids

    def update(self, phase: str, traj: Trajectory, adv_global: torch.Tensor, local: torch.Tensor) -> dict:
        """Optimise the phase's parameters on one rollout batch. Returns stats."""
        t = self.recipe.train
        obj = self.parts.objective
        b_global = adv_global.numel()
        pos_of = {int(gi): li for li, gi in enumerate(local.tolist())}
        n_terms = obj.num_terms(traj)
        stats: dict[str, list[float]] = defaultdict(list)
        opts_, clips = [], []
        if phase in ("model", "joint") and self.opt_model:
            opts_.append(self.opt_model)
            clips.append((self.model_params, t.model.max_grad_norm, "grad_norm_model"))
        if phase in ("schedule", "joint") and self.opt_schedule:
            opts_.append(self.opt_schedule)
            clips.append((self.schedule_params, t.schedule.max_grad_norm, "grad_norm_schedule"))
        clock = time.perf_counter()
        with torch.no_grad(), self._autocast(), self.full_parameters():
            bb = self.parts.backbone
            cond, uncond = bb.encode_prompts(traj.prompts), bb.null_conditioning(traj.batch_size)
            obj.prepare(
                Policies(bb, self.parts.schedule, self.parts.sampler, cond, uncond, self.reference), traj
            )
        times = {
            "time_prepare": time.perf_counter() - clock,
            "time_replay_backward": 0.0,
            "time_optimizer": 0.0,
        }
        bad = False
        for _ in range(t.epochs):
            perm = torch.randperm(b_global, generator=self.gens["update"])
            for mb in perm.chunk(t.minibatches):
                k = max(1, round(t.timestep_fraction * n_terms))
                terms = sorted(torch.randperm(n_terms, generator=self.gens["update"])[:k].tolist())
                # micro-batches of the global minibatch; each rank backwards its share
                size = max(1, math.ceil(len(mb) / t.gradient_accumulation))
                micro = [[pos_of[i] for i in m if i in pos_of] for m in _chunks(mb.tolist(), size)]
                groups = [[x] for x in terms] if obj.update_per_term else [terms]
                for step_terms in groups:
                    for opt in opts_:
                        opt.zero_grad(set_to_none=True)
                    clock = time.perf_counter()
                    ok = self._accumulate(phase, traj, adv_global, local, micro, step_terms, len(mb), stats)
                    times["time_replay_backward"] += time.perf_counter() - clock
                    clock = time.perf_counter()
                    ok = not self.dist.broadcast_flag(not ok)
                    if not ok:
                        bad = True
                        for opt in opts_:
                            opt.zero_grad(set_to_none=True)
                        continue
                    for ps, max_norm, label in clips:
                        norm = self.accelerator.clip_grad_norm_(ps, max_norm if max_norm else float("inf"))
                        if norm is not None:  # DeepSpeed clips inside its step
                            stats[label].append(float(norm))
                    for opt in opts_:
                        opt.step()
                    times["time_optimizer"] += time.perf_counter() - clock
        out = {k: sum(v) / len(v) for k, v in stats.items() if v and k not in ("ratio_min", "ratio_max")}
        if stats.get("ratio_min"):
            out["ratio_min"] = min(stats["ratio_min"])
        if stats.get("ratio_max"):
            out["ratio_max"] = max(stats["ratio_max"])
        out["bad_update"] = float(bad)
        out.update(times)
        return out

    def kl_to_reference(self, traj: Trajectory, local: torch.Tensor, b_global: int) -> dict:
        """KL from the frozen initial model to the current one on the rollout tokens.

        Replays every step of the rollout under the reference backbone (same tokens,
        same schedule actions) and compares with the recorded log-probs of the policy
        that sampled them, d_t = log pi_ref,t - log pi_theta,t (float32 [B, T], sums over
        the tokens revealed at step t):

        - ``kl_ref_k3``: mean over samples and steps of exp(d) - d - 1 (the k3 estimator
          the objectives' kl_beta penalty uses);
        - ``kl_ref_seq``: mean over samples of sum_t -d_t, the k1 estimate of the KL
          between the two policies' whole trajectories.

        Only the steps :func:`kl_steps` picks are replayed (means over them; the sum
        over t is T times their mean), so both are unbiased estimates over the
        rotation. Both are 0 while the model equals the reference. Returns {} without
        a reference."""
        if self.reference is None:
            return {}
        rb, lg = self.recipe.train.rollout_batch, self.recipe.logging
        steps = kl_steps(traj.num_steps, lg.kl_steps, self.iteration // max(1, lg.kl_every))
        k3, seq = [], []
        with torch.no_grad(), self._autocast():
            for idx in _chunks(list(range(traj.batch_size)), rb):
                sub = traj.select(torch.tensor(idx, dtype=torch.long))
                cond = self.reference.encode_prompts(sub.prompts)
                uncond = self.reference.null_conditioning(sub.batch_size)
                ref = torch.stack(
                    [
                        self.parts.sampler.replay_step(
                            self.reference, sub, t, cond, uncond
                        ).model_log_prob.float()
                        for t in steps
                    ],
                    dim=1,
                )
                d = ref.cpu() - sub.model_log_probs[:, steps].float().cpu()
                k3.append((torch.exp(d) - d - 1.0).mean(1))
                seq.append(-d.mean(1) * traj.num_steps)
        k3_global = self.dist.scatter_sum(torch.cat(k3).double(), local, b_global)
        seq_global = self.dist.scatter_sum(torch.cat(seq).double(), local, b_global)
        return {"kl_ref_k3": float(k3_global.mean()), "kl_ref_seq": float(seq_global.mean())}

    def _accumulate(self, phase, traj, adv_global, local, micro, terms, mb_size, stats) -> bool:
        """Backward the loss of this rank's part of one minibatch; False if non-finite.

        ``micro``: this rank's positions in each micro-batch of the global minibatch.
        Every rank runs the same backward passes (one per micro-batch and term chunk):
        gradients are synchronised on the last only (``no_sync`` before it), and a rank
        without samples in a micro-batch backwards one of its trajectories with weight 0
        so that it takes part in the synchronisation."""
        t, acc = self.recipe.train, self.accelerator
        scale = self.dist.world_size  # the engine averages the ranks' gradients; the loss is a sum
        steps = [(mi, chunk) for mi in micro for chunk in _chunks(terms, t.term_chunk)]
        ok = True
        for n, (mi, chunk) in enumerate(steps):
            if not mi and not self.dist.active:
                continue
            ix = torch.tensor(mi or [0], dtype=torch.long)
            sub = traj.select(ix)
            adv = adv_global[local[ix]].to(self.device)
            last = n == len(steps) - 1
            with nullcontext() if last else self._local_gradients(), self._autocast():
                out = self.train_step(phase, sub, adv, chunk)
                finite = bool(torch.isfinite(out.loss))
                if not finite and not self.dist.active:
                    return False
                weight = (len(mi) / mb_size) * (len(chunk) / len(terms)) * scale
                if out.loss.requires_grad:
                    acc.backward(out.loss * weight)
            if not finite:  # the other ranks still need this rank's backward passes
                ok = False
            elif mi and ok:
                stats["loss"].append(float(out.loss.detach()))
                for k, v in out.stats.items():
                    stats[k].append(float(v))
        return ok

    def iterate(self) -> dict:
        """Run iteration ``self.iteration`` (0-based) and return its metrics row."""
        phase, cycle = self.plan[self.iteration]
        t_start = time.perf_counter()
        self.parts.backbone.train()
        self.parts.schedule.train()
        traj, total, comps, timing, local, group_ids = self.rollout(phase)
        row: dict[str, Any] = {"iteration": self.iteration + 1, "phase": phase, "cycle": cycle}
        row["reward_mean"] = float(total.mean())
        row["reward_std"] = float(total.std(unbiased=False))
        for k, v in comps.items():
            row[f"reward/{k}_mean"] = float(v.mean())
            row[f"reward/{k}_std"] = float(v.std(unbiased=False))
        kl_every = self.recipe.logging.kl_every
        if kl_every and self.iteration % kl_every == 0:
            t_kl = time.perf_counter()
            row.update(self.kl_to_reference(traj, local, total.numel()))
            timing["time_kl"] = time.perf_counter() - t_kl
        finite = bool(torch.isfinite(total).all())
        t_upd = time.perf_counter()
        if finite:
            adv = group_advantages(total, group_ids)
            row["adv_abs_mean"] = float(adv.abs().mean())
            row["adv_zero_frac"] = float((adv == 0).float().mean())
            row.update(self.update(phase, traj, adv, local))
        else:
            row["bad_update"] = 1.0
            warnings.warn(f"iteration {self.iteration + 1}: non-finite reward; update skipped", stacklevel=1)
        timing["time_update"] = time.perf_counter() - t_upd
        acts = traj.actions.float().mean(0)  # [T, K]
        for ki, name in enumerate(ACTION_FIELDS):
            row[f"action/{name}_mean"] = float(acts[:, ki].mean())
            for step in range(acts.shape[0]):
                row[f"action/{name}/t{step:02d}"] = float(acts[step, ki])
        row.update(timing)
        row["time_iteration"] = time.perf_counter() - t_start
        if row.get("bad_update"):
            self.bad_in_row += 1
            self.bad_total += 1
            if row.get("bad_update") and "loss" not in row:
                warnings.warn(
                    f"iteration {self.iteration + 1}: non-finite loss; update skipped", stacklevel=1
                )
        else:
            self.bad_in_row = 0
        row["bad_updates_total"] = self.bad_total
        self.iteration += 1
        every = self.recipe.logging.image_every
        if every and self.iteration % every == 0:
            with self.full_parameters():
                if self.dist.is_main:
                    self._save_images(traj)
        return row

    def _save_images(self, traj: Trajectory) -> None:
        from mdmrl.images import save_grid

        n = min(16, traj.batch_size)
        with torch.no_grad():
            imgs = self.parts.backbone.decode(traj.final_tokens[:n])
        save_grid(
            imgs.float().cpu(),
            traj.prompts[:n],
            self.run_dir / "images" / f"iter_{self.iteration:06d}.png",
        )

    # -- the loop -----------------------------------------------------------------------
    def train(self, progress=None) -> str:
        """Iterate until the plan is done, a stop is requested (Ctrl-C) or too many
        non-finite updates in a row. Returns "done", "interrupted" or "diverged"."""
        lg = self.recipe.logging
        self.metrics = MetricsLog(self.run_dir, lg.tensorboard, lg.trackers) if self.dist.is_main else None
        if self.metrics:
            self.metrics.truncate(self.iteration + 1)
        prev = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if self.stop.requested:
                raise KeyboardInterrupt
            self.stop.requested = True
            self.log(
                "mdmrl: Ctrl-C: finishing this iteration, then writing a checkpoint (Ctrl-C again to abort)"
            )

        try:
            signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread
            prev = None
        status = "done"
        try:
            while self.iteration < len(self.plan):
                streams = self._stream_states()
                try:
                    row = self.iterate()
                except RewardProcessError as exc:
                    raise RewardProcessError(self._stopped_by_rewards(exc, streams)) from None
                if self.metrics:
                    self.metrics.append(row)
                if progress:
                    progress(self.iteration, len(self.plan), row)
                if self.bad_in_row >= self.recipe.train.max_bad_updates:
                    status = "diverged"
                    self.log(
                        f"mdmrl: {self.bad_in_row} non-finite updates in a row; stopping. "
                        f"The last good checkpoint is kept in {self.run_dir / 'checkpoints'}"
                    )
                    break
                if row.get("bad_update"):
                    continue  # never checkpoint a state that just produced a non-finite value
                last = self.iteration == len(self.plan)
                if self.stop.requested or last or self.iteration % lg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.stop.requested:
                    status = "interrupted"
                    break
        finally:
            if prev is not None:
                signal.signal(signal.SIGINT, prev)
            self.worker.close()
            if self.metrics:
                self.metrics.close()
        return status

    def _stream_states(self) -> dict[str, torch.Tensor]:
        return {**{s: g.get_state() for s, g in self.gens.items()}, "torch": torch.get_rng_state()}

    def _stopped_by_rewards(self, exc: RewardProcessError, streams: dict[str, torch.Tensor]) -> str:
        """Scoring failed in the rollout of the iteration after ``self.iteration`` (on
        every process: they agree before any update), so nothing but the random streams
        has moved: put them back and checkpoint the iterations done, unless that
        checkpoint exists or the last iteration was a skipped update (which the loop
        never checkpoints). Returns the error line, with how to go on."""
        for s, g in self.gens.items():
            g.set_state(streams[s])
        torch.set_rng_state(streams["torch"])
        if self.iteration and self.checkpointed_at != self.iteration and not self.bad_in_row:
            self.save_checkpoint()
            self.dist.barrier()  # every process names the checkpoint the main process wrote
        found = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        kept = f"checkpoint {found[-1].name} kept" if found else "no checkpoint yet"
        return (
            f"{exc}; the run stopped in iteration {self.iteration + 1} of {len(self.plan)} ({kept}); "
            f"resume with: mdmrl run --resume {self.run_dir}"
        )


def recipe_digest(loaded: LoadedRecipe) -> str:
    import hashlib

    data = resolved_dict(loaded)
    data.pop("reward_placement", None)  # where rewards run does not change them (and may change on resume)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
