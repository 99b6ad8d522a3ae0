"""The GRPO objective (Co-GRPO Eq. 9, 15, 17-21) on hand-made tensors and test toys."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from toy_plugin import LearnedOptions, ToyLearnedSchedule, ToySampler, ToySchedule
from toys import TinyBackbone, TinyOptions

from mdmrl.errors import UserError
from mdmrl.interfaces import Policies
from mdmrl.options import build
from mdmrl_plugins.cogrpo.objective import (
    GRPOObjective,
    GRPOOptions,
    clip_active,
    clipped_surrogate,
    kl_k3,
    ratio_model,
    ratio_phase,
    ratio_schedule,
)

PROMPTS = ["red big", "red big", "blue small", "blue small"]


def rollout(schedule, steps=3, seed=0):
    bb = TinyBackbone(TinyOptions(seed=seed))
    traj = ToySampler().sample(
        bb, schedule, PROMPTS, steps, torch.arange(4) + 10 * seed, torch.tensor([0, 0, 1, 1])
    )
    return bb, traj


def policies(bb, schedule, traj, reference=None):
    return Policies(
        bb,
        schedule,
        ToySampler(),
        bb.encode_prompts(traj.prompts),
        bb.null_conditioning(traj.batch_size),
        reference,
    )


def perturb(module, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_ratio_functions_are_log_differences():
    new, old = torch.tensor([0.5, -1.0]), torch.tensor([0.25, -3.0])
    assert torch.equal(ratio_model(new, old), torch.tensor([0.25, 2.0]))
    assert torch.equal(ratio_schedule(new, old), torch.tensor([0.25, 2.0]))
    m, s = torch.tensor([0.1, 0.2]), torch.tensor([-0.3, 0.4])
    assert torch.equal(ratio_phase(m, s, "model"), m)
    assert torch.equal(ratio_phase(m, s, "schedule"), s)
    assert torch.equal(ratio_phase(m, s, "joint"), m + s)
    assert torch.equal(ratio_phase(m, None, "joint"), m)
    with pytest.raises(ValueError, match="no ratio factor"):
        ratio_phase(m, None, "schedule")
    with pytest.raises(ValueError, match="unknown phase"):
        ratio_phase(m, s, "both")


def test_clipped_surrogate_values():
    r = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5])
    a = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    got = clipped_surrogate(r, a, 0.2)
    # A > 0: -min(r, clip(r)) -> r=0.5: -0.5 (unclipped), r=1.5: -1.2 (clipped)
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)) -> r=0.5: 0.8 (clipped), r=1.5: 1.5
    assert torch.allclose(got, torch.tensor([-0.5, -1.0, -1.2, 0.8, 1.0, 1.5]))
    assert clip_active(r, a, 0.2).tolist() == [False, False, True, True, False, False]


def test_kl_k3_is_unbiased_for_the_kl_of_the_sampling_policy():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(7, generator=g), 0)
    q = torch.softmax(torch.randn(7, generator=g), 0)
    # E_{x ~ p}[k3(log p(x), log q(x))] = KL(p || q) exactly
    est = (p * kl_k3(p.log(), q.log())).sum()
    exact = (p * (p.log() - q.log())).sum()
    assert torch.allclose(est, exact, atol=1e-6)
    assert bool((kl_k3(p.log(), q.log()) >= 0).all())
    assert torch.equal(kl_k3(p.log(), p.log()), torch.zeros(7))


def manual_loss(bb, schedule, traj, adv, terms, phase, eps):
    """The clipped surrogate written out from the paper, independently of the objective."""
    sampler = ToySampler()
    cond, uncond = bb.encode_prompts(traj.prompts), bb.null_conditioning(traj.batch_size)
    total = 0.0
    for t in terms:
        log_r = torch.zeros(traj.batch_size)
        if phase in ("model", "joint"):
            new = sampler.replay_step(bb, traj, t, cond, uncond).model_log_prob
            log_r = log_r + new - traj.model_log_probs[:, t]
        if phase in ("schedule", "joint") and schedule.stochastic:
            new_s = schedule.log_prob(t, traj.num_steps, None, traj.raw_actions[:, t])
            log_r = log_r + new_s - traj.schedule_log_probs[:, t]
        r = log_r.exp()
        total = total - torch.min(r * adv, r.clamp(1 - eps, 1 + eps) * adv).mean()
    return total / len(terms)


@pytest.mark.parametrize("phase", ["model", "schedule", "joint"])
def test_loss_matches_the_written_out_surrogate(phase):
    sched = ToyLearnedSchedule(LearnedOptions(init_bias=0.0))
    bb, traj = rollout(sched, steps=4)
    perturb(bb, 0.2)
    with torch.no_grad():
        sched.bias.fill_(0.4)
    adv = torch.tensor([1.0, -1.0, 0.7, -0.7])
    obj = GRPOObjective(GRPOOptions(clip_eps=0.2))
    out = obj.loss(policies(bb, sched, traj), traj, adv, [0, 2, 3], phase)
    want = manual_loss(bb, sched, traj, adv, [0, 2, 3], phase, 0.2)
    assert torch.allclose(out.loss, want, atol=1e-6)
    assert out.stats["ratio_min"] <= out.stats["ratio_mean"] <= out.stats["ratio_max"]
    assert 0.0 <= out.stats["clip_frac"] <= 1.0
    assert out.stats["approx_kl"] >= 0.0
    assert ("schedule_logprob_mean" in out.stats) == (phase != "model")


def test_schedule_phase_trains_only_the_schedule():
    sched = ToyLearnedSchedule(LearnedOptions(init_bias=0.0))
    bb, traj = rollout(sched)
    with torch.no_grad():
        sched.bias.fill_(0.1)
    obj = GRPOObjective()
    out = obj.loss(
        policies(bb, sched, traj), traj, torch.tensor([1.0, -1.0, 0.5, -0.5]), [0, 1, 2], "schedule"
    )
    out.loss.backward()
    assert all(p.grad is None for p in bb.parameters())
    assert sched.bias.grad is not None and float(sched.bias.grad.abs()) > 0


def test_model_phase_ignores_the_schedule():
    sched = ToyLearnedSchedule(LearnedOptions(init_bias=0.0))
    bb, traj = rollout(sched)
    with torch.no_grad():
        sched.bias.fill_(0.5)  # the schedule ratio is far from 1 but must not matter
    obj = GRPOObjective()
    out = obj.loss(policies(bb, sched, traj), traj, torch.tensor([1.0, -1.0, 0.5, -0.5]), [0, 1, 2], "model")
    out.loss.backward()
    assert sched.bias.grad is None
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in bb.parameters())
    assert out.stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_schedule_phase_with_a_fixed_schedule_is_refused():
    bb, traj = rollout(ToySchedule())
    with pytest.raises(ValueError, match="stochastic"):
        GRPOObjective().loss(policies(bb, ToySchedule(), traj), traj, torch.ones(4), [0], "schedule")


def test_advantage_clip():
    sched = ToySchedule()
    bb, traj = rollout(sched)
    perturb(bb, 0.1)
    adv = torch.tensor([3.0, -3.0, 0.5, -0.5])
    clipped = GRPOObjective(GRPOOptions(adv_clip=1.0)).loss(
        policies(bb, sched, traj), traj, adv, [0, 1], "model"
    )
    want = GRPOObjective().loss(policies(bb, sched, traj), traj, adv.clamp(-1, 1), [0, 1], "model")
    assert torch.equal(clipped.loss, want.loss)


def test_kl_to_the_reference():
    sched = ToySchedule()
    bb, traj = rollout(sched)
    ref = copy.deepcopy(bb).requires_grad_(False)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    plain = GRPOObjective().loss(policies(bb, sched, traj), traj, adv, [0, 1, 2], "model")
    with_kl = GRPOObjective(GRPOOptions(kl_beta=0.5)).loss(
        policies(bb, sched, traj, ref), traj, adv, [0, 1, 2], "model"
    )
    assert with_kl.stats["kl_ref"] == 0.0  # the reference is the current model
    assert torch.allclose(with_kl.loss, plain.loss)
    perturb(bb, 0.3)
    a = GRPOObjective().loss(policies(bb, sched, traj), traj, adv, [0, 1, 2], "model")
    b = GRPOObjective(GRPOOptions(kl_beta=0.5)).loss(
        policies(bb, sched, traj, ref), traj, adv, [0, 1, 2], "model"
    )
    assert b.stats["kl_ref"] > 0
    assert torch.allclose(b.loss, a.loss + 0.5 * b.stats["kl_ref"], atol=1e-5)
    b.loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    with pytest.raises(UserError, match="kl_beta"):
        GRPOObjective(GRPOOptions(kl_beta=0.5)).loss(policies(bb, sched, traj), traj, adv, [0], "model")


def test_num_terms_is_the_number_of_steps():
    _, traj = rollout(ToySchedule(), steps=5)
    assert GRPOObjective().num_terms(traj) == 5


def test_options_are_validated():
    problems: list[str] = []
    build(GRPOOptions, {"clip_eps": 1.0, "kl_beta": -1.0, "adv_clip": 0.0}, "objective.options", problems)
    assert len(problems) == 3
    assert any("clip_eps" in p for p in problems)
    problems = []
    opts = build(GRPOOptions, {"clip_eps": 0.1, "adv_clip": 2.5}, "objective.options", problems)
    assert not problems and opts.clip_eps == 0.1 and opts.adv_clip == 2.5
    with pytest.raises(UserError, match="clip_eps"):
        GRPOObjective(GRPOOptions(clip_eps=0.0))


def test_loss_is_the_mean_over_terms():
    sched = ToySchedule()
    bb, traj = rollout(sched, steps=3)
    perturb(bb, 0.2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    obj = GRPOObjective()
    pol = policies(bb, sched, traj)
    per = [float(obj.loss(pol, traj, adv, [t], "model").loss.detach()) for t in range(3)]
    assert float(obj.loss(pol, traj, adv, [0, 1, 2], "model").loss.detach()) == pytest.approx(
        sum(per) / 3, rel=1e-5
    )
    assert not math.isclose(per[0], per[1])


def test_schedule_updates_move_the_mean_towards_advantaged_actions():
    from mdmrl.interfaces import BuildContext
    from mdmrl_plugins.cogrpo.gaussian import GaussianOptions, GaussianSchedule
    from mdmrl_plugins.cogrpo.sampler import ConfidenceSampler

    bb = TinyBackbone(TinyOptions(seed=3))
    opts = GaussianOptions(base="meissonic", sigma=0.3, trainable=["remask_ratio"], hidden=8)
    sched = GaussianSchedule.from_options(opts, BuildContext(backbone=bb))
    sampler = ConfidenceSampler()
    prompts = ["red big"] * 8
    traj = sampler.sample(bb, sched, prompts, 3, torch.arange(8), torch.zeros(8, dtype=torch.long))
    cond, uncond = bb.encode_prompts(prompts), bb.null_conditioning(8)
    feats = sampler.replay_step(bb, traj, 0, cond, uncond).features
    with torch.no_grad():
        mean0 = sched.mean(0, 3, feats)[0][:, 1]  # [B] raw mean of the ratio logit
    noise = traj.raw_actions[:, 0, 1] - mean0  # [B]: the sampled offsets
    adv = (noise - noise.mean()) / noise.std()  # reward the samples with a higher ratio
    opt = torch.optim.SGD(sched.parameters(), lr=0.05)
    obj = GRPOObjective()
    for _ in range(5):
        opt.zero_grad()
        pol = Policies(bb, sched, sampler, bb.encode_prompts(prompts), bb.null_conditioning(8))
        obj.loss(pol, traj, adv, [0], "schedule").loss.backward()
        opt.step()
    with torch.no_grad():
        moved = sched.mean(0, 3, feats)[0][:, 1] - mean0
    assert float(moved.mean()) > 0.01


RECIPE = """\
# mdmrl run cogrpo-tiny.toml
seed = 1
device = "cpu"
[backbone]
name = "tiny"
[schedule]
name = "gaussian"
[schedule.options]
base = "meissonic"
sigma = 0.2
hidden = 8
[sampler]
name = "confidence"
steps = 3
[[rewards]]
name = "toy-count"
weight = 1.0
[objective]
name = "grpo"
[objective.options]
clip_eps = 0.2
kl_beta = 0.1
[prompts.train]
name = "toy-prompts"
[train]
mode = "alternating"
cycles = 1
model_iterations = 1
schedule_iterations = 1
[train.model]
lr = 0.01
group_size = 2
batch_size = 4
[train.schedule]
lr = 0.01
group_size = 2
batch_size = 4
[eval]
steps = [3]
seeds = 1
[logging]
image_every = 0
tensorboard = false
"""


def test_gaussian_and_grpo_train_through_the_engine(toy_registry, tmp_path):
    import json

    import mdmrl_plugins.cogrpo.plugin as cogrpo_plugin
    from mdmrl.runner import run

    toy_registry.register_plugin(cogrpo_plugin, "cogrpo")
    recipe = tmp_path / "cogrpo-tiny.toml"
    recipe.write_text(RECIPE)
    rd = run(str(recipe), str(tmp_path / "run"), [], progress=False)
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["model", "schedule"]
    assert "kl_ref" in rows[0] and "grad_norm_model" in rows[0]
    assert "schedule_logprob_mean" in rows[1] and "grad_norm_schedule" in rows[1]
    assert all(r["bad_update"] == 0.0 for r in rows)
