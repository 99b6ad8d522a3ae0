"""The Gaussian schedule policy (Co-GRPO Eq. 14)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toys import TinyBackbone, TinyOptions

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext, SchedulePolicy
from mdmrl.trajectory import ACTION_FIELDS, NUM_ACTIONS
from mdmrl_plugins.cogrpo.gaussian import (
    GaussianOptions,
    GaussianSchedule,
    auto_hidden,
    count_parameters,
    policy_param_count,
    size_report,
    to_raw,
    to_valid,
)

SETTINGS = settings(max_examples=25, deadline=None)


class LinearBase(SchedulePolicy):
    """A fixed schedule for tests: tau_s = 1 + t/T, r = 1 - (t+1)/T, tau_r = 2, s = 3."""

    name = "test-linear"

    def __init__(self, options=None):
        super().__init__()

    def act(self, step, num_steps, batch_size, features, generator, deterministic=False):
        a = torch.tensor([1.0 + step / num_steps, 1.0 - (step + 1) / num_steps, 2.0, 3.0])
        acts = a.expand(batch_size, NUM_ACTIONS).clone()
        return acts, acts.clone(), torch.zeros(batch_size)

    def log_prob(self, step, num_steps, features, raw_actions):
        return torch.zeros(raw_actions.shape[0])


def make_policy(
    trainable=ACTION_FIELDS, sigma=0.1, dim=8, grid=(3, 4), hidden=16, perturb=0.0, seed=0
) -> GaussianSchedule:
    opts = GaussianOptions(base="test-linear", sigma=sigma, trainable=list(trainable), hidden=hidden)
    pol = GaussianSchedule(opts, dim, grid, LinearBase(), hidden)
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in pol.net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * perturb)
    return pol


def feats(b, grid=(3, 4), dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, grid[0] * grid[1], dim, generator=g)


subsets = st.lists(st.sampled_from(ACTION_FIELDS), min_size=1, max_size=4, unique=True)


@SETTINGS
@given(
    u=st.lists(st.floats(-6, 6, allow_nan=False), min_size=NUM_ACTIONS, max_size=NUM_ACTIONS),
)
def test_raw_valid_round_trip(u):
    raw = torch.tensor(u, dtype=torch.float64)
    valid = to_valid(raw)
    assert valid[1] > 0 and valid[1] < 1
    assert bool((valid[[0, 2, 3]] > 0).all())
    assert torch.allclose(to_raw(valid), raw, atol=1e-9)


def test_edge_values_map_to_finite_raw():
    acts = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 1.0, 9.0]])
    raw = to_raw(acts)
    assert torch.isfinite(raw).all()
    assert torch.allclose(to_valid(raw), acts, atol=1e-5)


def test_untrained_mean_is_the_base_schedule():
    pol = make_policy()
    base = LinearBase()
    for t in range(5):
        f = feats(3, seed=t)
        acts, raw, logp = pol.act(t, 5, 3, f, None, deterministic=True)
        want, _, _ = base.act(t, 5, 3, None, None)
        mean, _ = pol.mean(t, 5, f)
        assert torch.equal(raw, mean)
        assert torch.equal(mean, to_raw(want))  # the offset is exactly zero
        assert torch.allclose(acts, want, rtol=1e-6, atol=1e-6)
        # the log-density at the mean: 4 components, each -log(sigma) - log(2 pi)/2
        assert torch.allclose(logp, torch.full((3,), 4 * (-math.log(0.1) - 0.5 * math.log(2 * math.pi))))


@SETTINGS
@given(
    trainable=subsets,
    sigma=st.floats(0.01, 2.0),
    b=st.integers(1, 4),
    step=st.integers(0, 5),
    seed=st.integers(0, 1000),
)
def test_log_prob_matches_torch_distributions(trainable, sigma, b, step, seed):
    pol = make_policy(trainable, sigma=sigma, perturb=0.3, seed=seed)
    f = feats(b, seed=seed)
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(b, NUM_ACTIONS, generator=g) * 2
    mean, _ = pol.mean(step, 6, f)
    idx = [ACTION_FIELDS.index(x) for x in trainable]
    ref = torch.distributions.Normal(mean[:, idx], sigma).log_prob(raw[:, idx]).sum(-1)
    got = pol.log_prob(step, 6, f, raw)
    assert got.shape == (b,)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    # components that are not trainable do not enter the log-prob
    other = [k for k in range(NUM_ACTIONS) if k not in idx]
    raw2 = raw.clone()
    raw2[:, other] += 7.0
    assert torch.equal(pol.log_prob(step, 6, f, raw2), got)


@SETTINGS
@given(trainable=subsets, seed=st.integers(0, 1000), b=st.integers(1, 4))
def test_act_samples_only_trainable_components(trainable, seed, b):
    pol = make_policy(trainable, sigma=0.5, perturb=0.3, seed=seed)
    f = feats(b, seed=seed)
    acts, raw, logp = pol.act(2, 4, b, f, torch.Generator().manual_seed(seed))
    base, _, _ = LinearBase().act(2, 4, b, None, None)
    idx = [ACTION_FIELDS.index(x) for x in trainable]
    other = [k for k in range(NUM_ACTIONS) if k not in idx]
    assert torch.equal(acts[:, other], base[:, other])
    assert torch.allclose(acts[:, idx], to_valid(raw)[:, idx])
    assert not torch.allclose(raw[:, idx], pol.mean(2, 4, f)[0][:, idx])
    # the returned log-prob is the policy's log-prob of the returned raw sample
    assert torch.allclose(logp, pol.log_prob(2, 4, f, raw), atol=1e-6)
    # reproducible from the generator's seed
    again = pol.act(2, 4, b, f, torch.Generator().manual_seed(seed))
    assert all(torch.equal(x, y) for x, y in zip((acts, raw, logp), again))


def test_sample_spread_is_sigma():
    pol = make_policy(sigma=0.25, perturb=0.2)
    f = feats(1).expand(4000, -1, -1)
    _, raw, _ = pol.act(1, 4, 4000, f, torch.Generator().manual_seed(0))
    mean, _ = pol.mean(1, 4, f[:1])
    assert torch.allclose(raw.mean(0), mean[0], atol=0.03)
    assert torch.allclose(raw.std(0), torch.full((4,), 0.25), rtol=0.06)


def test_gradients_reach_the_network_only_through_log_prob():
    pol = make_policy(perturb=0.2)
    f = feats(2)
    acts, raw, logp = pol.act(0, 3, 2, f, torch.Generator().manual_seed(1))
    assert not acts.requires_grad and not raw.requires_grad and not logp.requires_grad
    pol.log_prob(0, 3, f, raw + 0.3).sum().backward()
    grads = [p.grad for p in pol.net.parameters()]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_fresh_policy_learns_from_the_zero_last_layer():
    pol = make_policy()
    pol.log_prob(0, 3, feats(2), torch.ones(2, NUM_ACTIONS)).sum().backward()
    assert float(pol.net.fc2.weight.grad.abs().sum()) > 0


def test_step_position_interpolates_across_step_counts():
    pol = make_policy(perturb=0.3)
    f = feats(2)
    d8 = pol.mean(3, 8, f)[0] - to_raw(pol.base_actions(3, 8, 2, f.device))
    d16 = pol.mean(7, 16, f)[0] - to_raw(pol.base_actions(7, 16, 2, f.device))
    d16b = pol.mean(6, 16, f)[0] - to_raw(pol.base_actions(6, 16, 2, f.device))
    assert torch.allclose(d8, d16, atol=1e-6)  # both at (t + 1) / T = 0.5
    assert not torch.allclose(d8, d16b)


def test_features_are_required():
    pol = make_policy()
    with pytest.raises(ValueError, match="features"):
        pol.act(0, 3, 2, None, None)


def test_param_count_formula_and_auto_width():
    for d, h, k in [(8, 8, 4), (96, 40, 2), (17, 5, 1)]:
        net = make_policy(trainable=ACTION_FIELDS[:k], dim=d, hidden=h).net
        assert count_parameters(net) == policy_param_count(d, h, k)
    h = auto_hidden(96, 4, 5000)
    assert policy_param_count(96, h, 4) <= 5000 < policy_param_count(96, h + 1, 4)


@pytest.fixture
def registry_with_bases(toy_registry):
    from mdmrl.hookspecs import hookimpl
    from mdmrl_plugins.cogrpo.gaussian import GaussianSchedule as G

    class P:
        @hookimpl
        def register_schedules(self, register):
            register(LinearBase)
            register(G)

    toy_registry.register_plugin(P(), "test-gaussian")
    return toy_registry


def test_from_options_uses_the_registry_and_sizes_to_the_backbone(registry_with_bases):
    bb = TinyBackbone(TinyOptions(dim=8))
    ctx = BuildContext(backbone=bb)
    pol = GaussianSchedule.from_options(GaussianOptions(base="test-linear", hidden=12), ctx)
    assert pol.hidden == 12 and isinstance(pol.base, LinearBase)
    rep = size_report(bb, pol)
    assert rep["policy_params"] == policy_param_count(8, 12, 4)


def test_from_options_errors(registry_with_bases):
    ctx = BuildContext(backbone=TinyBackbone())
    with pytest.raises(UserError, match=r"schedule.options.base: Unknown schedule 'nope'.*test-linear"):
        GaussianSchedule.from_options(GaussianOptions(base="nope"), ctx)
    with pytest.raises(UserError, match="learned schedule"):
        GaussianSchedule.from_options(GaussianOptions(base="gaussian"), ctx)
    with pytest.raises(UserError, match="trainable: empty"):
        GaussianSchedule.from_options(GaussianOptions(base="test-linear", trainable=[]), ctx)
    with pytest.raises(UserError, match="backbone"):
        GaussianSchedule.from_options(GaussianOptions(base="test-linear"), BuildContext())


def test_size_is_about_one_percent_of_the_shapes_backbone(registry_with_bases):
    from mdmrl_plugins.shapes.model import ShapesMDM, ShapesMDMOptions

    torch.manual_seed(0)
    bb = ShapesMDM.from_options(ShapesMDMOptions(weights="random"), BuildContext())
    pol = GaussianSchedule.from_options(GaussianOptions(base="test-linear"), BuildContext(backbone=bb))
    ratio = size_report(bb, pol)["ratio"]
    assert 0.005 < ratio <= 0.01


def test_base_options_configure_the_base_schedule_and_are_validated():
    from toys import TinyBackbone

    from mdmrl.errors import UserError
    from mdmrl.interfaces import BuildContext
    from mdmrl_plugins.cogrpo.gaussian import GaussianOptions, GaussianSchedule

    ctx = BuildContext(backbone=TinyBackbone())
    pol = GaussianSchedule.from_options(GaussianOptions(base_options={"cfg_scale": 3.0}), ctx)
    acts, _, _ = pol.act(0, 8, 2, torch.zeros(2, 12, 8), None, deterministic=True)
    assert torch.allclose(acts[:, 3], torch.tensor([3.0, 3.0]), atol=1e-4)
    with pytest.raises(UserError, match="schedule.options.base_options.cfg: unknown key"):
        GaussianSchedule.from_options(GaussianOptions(base_options={"cfg": 3.0}), ctx)
