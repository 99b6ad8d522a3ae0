"""A test-only plug-in implementing every hook with trivial but real parts, so the
core (registry, recipes, engine, checkpoints, CLI) is tested independently of the
first-party plug-ins. Register it with ``get_registry().register_plugin(TOYS, "toys")``
or expose it through MDMRL test entry points."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from toys import TinyBackbone

from mdmrl.hookspecs import hookimpl
from mdmrl.interfaces import (
    Objective,
    PromptSource,
    Rewarder,
    Sampler,
    SchedulePolicy,
    StepReplay,
)
from mdmrl.trajectory import NUM_ACTIONS, LossOutput, Trajectory


class ToySchedule(SchedulePolicy):
    """Fixed: r = cos((t+1)/T * pi/2), tau_s = 1, tau_r = 0, s = 0 (no guidance)."""

    name = "toy-cosine"

    def __init__(self, options=None):
        super().__init__()

    def act(self, step, num_steps, batch_size, features, generator, deterministic=False):
        a = torch.tensor([1.0, math.cos((step + 1) / num_steps * math.pi / 2), 0.0, 0.0])
        acts = a.expand(batch_size, NUM_ACTIONS).clone()
        return acts, acts.clone(), torch.zeros(batch_size)

    def log_prob(self, step, num_steps, features, raw_actions):
        return torch.zeros(raw_actions.shape[0])


@dataclass
class LearnedOptions:
    init_bias: float = field(default=0.0, metadata={"doc": "initial mean of the raw re-mask logit"})


class ToyLearnedSchedule(ToySchedule):
    """A one-parameter Gaussian over the re-mask logit (sigma 0.3)."""

    name = "toy-learned"
    Options = LearnedOptions
    stochastic = True

    def __init__(self, options: LearnedOptions):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(float(options.init_bias)))

    def _mean(self, step, num_steps):
        base = math.cos((step + 1) / num_steps * math.pi / 2)
        base = min(max(base, 1e-4), 1 - 1e-4)
        return math.log(base / (1 - base)) + self.bias

    def act(self, step, num_steps, batch_size, features, generator, deterministic=False):
        mean = self._mean(step, num_steps)
        noise = (
            torch.zeros(batch_size) if deterministic else torch.randn(batch_size, generator=generator) * 0.3
        )
        raw_r = (mean + noise).detach()
        raw = torch.zeros(batch_size, NUM_ACTIONS)
        raw[:, 0], raw[:, 1] = 1.0, raw_r
        acts = raw.clone()
        acts[:, 1] = torch.sigmoid(raw_r)
        return acts, raw, self.log_prob(step, num_steps, None, raw).detach()

    def log_prob(self, step, num_steps, features, raw_actions):
        mean = self._mean(step, num_steps)
        return torch.distributions.Normal(mean, 0.3).log_prob(raw_actions[:, 1])


class ToySampler(Sampler):
    """Random-order unmasking: at step t, keep ceil(r * N) positions masked (at least
    one fewer than before), chosen uniformly; tokens from softmax(logits / tau_s)."""

    name = "toy-sampler"

    def __init__(self, options=None):
        pass

    def _log_probs(self, backbone, tokens, cond, timestep, temperature):
        out = backbone(tokens, cond, timestep)
        return torch.log_softmax(out.logits / temperature[:, None, None], -1), out.features

    def sample(
        self, backbone, schedule, prompts, num_steps, seeds, group_ids=None, deterministic_schedule=False
    ):
        b, n = len(prompts), backbone.num_tokens
        mask = backbone.mask_token_id
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        cond = backbone.encode_prompts(prompts)
        tokens = torch.full((b, n), mask, dtype=torch.long)
        states, fills, acts_l, raws, mlp, slp = [tokens.clone()], [], [], [], [], []
        with torch.no_grad():
            for t in range(num_steps):
                masked = tokens == mask
                timestep = masked.float().mean(1)
                per_row = [
                    schedule.act(t, num_steps, 1, None, gens[i], deterministic_schedule) for i in range(b)
                ]
                acts, raw, sl = (torch.cat(x) for x in zip(*per_row))
                logp, _ = self._log_probs(backbone, tokens, cond, timestep, acts[:, 0])
                new = tokens.clone()
                fill = torch.zeros(b, n, dtype=torch.bool)
                for i in range(b):
                    m = int(masked[i].sum())
                    keep = 0 if t == num_steps - 1 else min(m - 1, math.ceil(float(acts[i, 1]) * n))
                    idx = masked[i].nonzero().flatten()
                    order = idx[torch.randperm(idx.numel(), generator=gens[i])]
                    chosen = order[: m - max(keep, 0)]
                    gumbel = -torch.log(
                        -torch.log(torch.rand(chosen.numel(), logp.shape[-1], generator=gens[i]))
                    )
                    new[i, chosen] = (logp[i, chosen] + gumbel).argmax(-1)
                    fill[i, chosen] = True
                lp = (logp.gather(-1, new.clamp_max(logp.shape[-1] - 1)[..., None])[..., 0] * fill).sum(1)
                tokens = new
                states.append(tokens.clone())
                fills.append(fill)
                acts_l.append(acts)
                raws.append(raw)
                mlp.append(lp)
                slp.append(sl)
        traj = Trajectory(
            tokens=torch.stack(states, 1),
            filled=torch.stack(fills, 1),
            actions=torch.stack(acts_l, 1),
            raw_actions=torch.stack(raws, 1),
            model_log_probs=torch.stack(mlp, 1),
            schedule_log_probs=torch.stack(slp, 1),
            seeds=seeds.clone(),
            prompts=list(prompts),
            group_ids=group_ids.clone() if group_ids is not None else torch.arange(b),
        )
        traj.validate(mask)
        return traj

    def replay_step(self, backbone, traj, step, cond, uncond):
        tokens = traj.tokens[:, step]
        timestep = (tokens == backbone.mask_token_id).float().mean(1)
        logp, feats = self._log_probs(backbone, tokens, cond, timestep, traj.actions[:, step, 0])
        nxt = traj.tokens[:, step + 1].clamp_max(logp.shape[-1] - 1)
        lp = (logp.gather(-1, nxt[..., None])[..., 0] * traj.filled[:, step]).sum(1)
        return StepReplay(model_log_prob=lp, features=feats.detach())


@dataclass
class MeanOptions:
    target: int = field(default=0, metadata={"doc": "token id that scores 1", "min": 0})


class ToyReward(Rewarder):
    """Fraction of tokens equal to ``target``."""

    name = "toy-count"
    Options = MeanOptions

    def __init__(self, options: MeanOptions):
        self.target = options.target

    def score(self, batch):
        return (batch.tokens == self.target).float().mean(1).cpu()


class ToyNaNReward(Rewarder):
    name = "toy-nan"

    def __init__(self, options=None):
        pass

    def score(self, batch):
        return torch.full((len(batch.prompts),), float("nan"))


@dataclass
class PGOptions:
    clip_eps: float = field(default=0.2, metadata={"min_exclusive": 0.0})


class ToyObjective(Objective):
    """Clipped surrogate on the per-step joint ratio (model + schedule log-probs)."""

    name = "toy-pg"
    Options = PGOptions

    def __init__(self, options: PGOptions):
        self.eps = options.clip_eps

    def num_terms(self, traj):
        return traj.num_steps

    def loss(self, policies, traj, advantages, terms, phase):
        total, ratios = 0.0, []
        for t in terms:
            log_ratio = torch.zeros(traj.batch_size)
            if phase in ("model", "joint"):
                rep = policies.sampler.replay_step(policies.backbone, traj, t, policies.cond, policies.uncond)
                log_ratio = log_ratio + rep.model_log_prob - traj.model_log_probs[:, t]
            if phase in ("schedule", "joint"):
                lp = policies.schedule.log_prob(t, traj.num_steps, None, traj.raw_actions[:, t])
                log_ratio = log_ratio + lp - traj.schedule_log_probs[:, t]
            r = log_ratio.exp()
            ratios.append(r.detach())
            total = total - torch.min(r * advantages, r.clamp(1 - self.eps, 1 + self.eps) * advantages).mean()
        allr = torch.cat(ratios)
        return LossOutput(
            loss=total / len(terms),
            stats={
                "ratio_mean": float(allr.mean()),
                "ratio_min": float(allr.min()),
                "ratio_max": float(allr.max()),
            },
        )


@dataclass
class PromptOptions:
    words: list[str] = field(default_factory=lambda: ["red", "blue", "green", "big", "small"])


class ToyPrompts(PromptSource):
    name = "toy-prompts"
    Options = PromptOptions

    def __init__(self, options: PromptOptions):
        self.words = options.words

    def sample(self, n, generator):
        idx = torch.randint(0, len(self.words), (n, 2), generator=generator)
        return [f"{self.words[a]} {self.words[b]}" for a, b in idx.tolist()]

    def evaluation(self):
        return [f"{a} {b}" for a in self.words[:3] for b in self.words[3:]]

    def categorize(self, prompts):
        return [p.split()[1] for p in prompts]


class ToyPlugin:
    @hookimpl
    def register_backbones(self, register):
        register(TinyBackbone)

    @hookimpl
    def register_schedules(self, register):
        register(ToySchedule)
        register(ToyLearnedSchedule)

    @hookimpl
    def register_samplers(self, register):
        register(ToySampler)

    @hookimpl
    def register_rewarders(self, register):
        register(ToyReward)
        register(ToyNaNReward)

    @hookimpl
    def register_objectives(self, register):
        register(ToyObjective)

    @hookimpl
    def register_prompt_sources(self, register):
        register(ToyPrompts)


TOYS = ToyPlugin()

TOY_RECIPE = """\
# mdmrl run tests/toy.toml
seed = 3
device = "cpu"
[backbone]
name = "tiny"
[schedule]
name = "toy-learned"
[sampler]
name = "toy-sampler"
steps = 3
[[rewards]]
name = "toy-count"
weight = 1.0
[rewards.options]
target = 1
[objective]
name = "toy-pg"
[prompts.train]
name = "toy-prompts"
[train]
mode = "alternating"
cycles = 2
model_iterations = 2
schedule_iterations = 1
minibatches = 2
[train.model]
lr = 0.05
group_size = 4
batch_size = 8
[train.schedule]
lr = 0.05
group_size = 4
batch_size = 8
[eval]
steps = [3]
seeds = 2
[logging]
image_every = 2
tensorboard = false
"""
