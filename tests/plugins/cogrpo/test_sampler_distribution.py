"""The per_sample draw (inverse CDF over the masked rows) samples the same distribution
as the Gumbel-max and multinomial draws it replaces: chi-square tests on many draws,
at the function level and through the sampler; and the row-wise log-prob used by the
rollout and the replay agrees with the full-tensor reference."""

from __future__ import annotations

import pytest
import torch
from toys import FixedLogits, Scripted

from mdmrl_plugins.cogrpo.sampler import (
    DENSE_MAX_CODEBOOK,
    TARGET_FLOOR,
    ConfidenceOptions,
    ConfidenceSampler,
    filled_log_prob,
    guided_log_probs,
    guided_logits,
    guided_rows,
    inverse_cdf_sample_,
    sample_from_log_probs,
    step_log_prob,
)

#: Significance level of every goodness-of-fit test below (draws are seeded, so each
#: test is deterministic; a correct sampler passes with probability 1 - ALPHA).
ALPHA = 1e-3


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof): the regularised upper incomplete gamma."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of ``counts`` [V] against ``probs`` [V];
    categories expected fewer than 5 times are pooled into one."""
    n = counts.sum().double()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts.double()[~small], counts.double()[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


def two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of the chi-square test that two count vectors of equal totals come from
    one distribution (categories empty in both are dropped)."""
    assert int(a.sum()) == int(b.sum())
    a, b = a.double(), b.double()
    keep = (a + b) > 0
    stat = float(((a[keep] - b[keep]) ** 2 / (a[keep] + b[keep])).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


def draw(how: str, logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens long [M] and their log-probs float32 [M] from softmax(logits [M, V]), one
    uniform of [M] each: by inverse_cdf_sample_ on the logits ("logits") or by
    sample_from_log_probs on their log-softmax ("log_probs", the sampler's draw for
    small codebooks)."""
    if how == "logits":
        return inverse_cdf_sample_(logits.clone(), uniforms)
    tokens, log_p = sample_from_log_probs(logits.log_softmax(-1), uniforms.clamp_min(TARGET_FLOOR)[:, None])
    return tokens.squeeze(1), log_p.squeeze(1)


DRAWS = ("logits", "log_probs")


def draw_counts(
    logits: torch.Tensor, draws: int, seed: int, how: str = "logits", chunk: int = 20_000
) -> torch.Tensor:
    """Counts [V] of ``draws`` tokens drawn by :func:`draw` from softmax(logits [V])."""
    g = torch.Generator().manual_seed(seed)
    v = logits.shape[0]
    counts = torch.zeros(v, dtype=torch.long)
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        tokens, _ = draw(how, logits.expand(m, v).contiguous(), torch.rand(m, generator=g))
        counts += torch.bincount(tokens, minlength=v)
    return counts


# --------------------------------------------------------------------------- the draw itself


@pytest.mark.parametrize(
    "v, how",
    # 512 takes the two-level search of inverse_cdf_sample_ (blocks of 16 or 32)
    [(7, "logits"), (16, "logits"), (512, "logits"), (7, "log_probs"), (DENSE_MAX_CODEBOOK, "log_probs")],
)
def test_inverse_cdf_draws_follow_the_softmax(v, how):
    g = torch.Generator().manual_seed(v)
    logits = torch.randn(v, generator=g) * 1.5
    probs = torch.softmax(logits, -1)
    counts = draw_counts(logits, 200_000, seed=1, how=how)
    assert goodness_of_fit(counts, probs) > ALPHA
    # the test is sharp: the same draws are rejected against a 10 % hotter softmax
    assert goodness_of_fit(counts, torch.softmax(logits / 1.1, -1)) < 1e-9


def test_inverse_cdf_returns_the_log_prob_of_its_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 512, generator=g) * 4
    want = logits.log_softmax(-1)
    tokens, log_p = inverse_cdf_sample_(logits, torch.rand(300, generator=g))
    assert torch.allclose(log_p, want.gather(-1, tokens[:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(logits, (want - want.amax(-1, keepdim=True)).exp(), atol=1e-6)  # e, in place


def test_the_log_prob_draw_returns_the_entry_of_its_token_bit_for_bit():
    """The sampler sums these values as log pi_model,t for small codebooks: they must be
    the log-softmax entries that step_log_prob reads, not a recomputation."""
    g = torch.Generator().manual_seed(0)
    log_probs = (torch.randn(500, 16, generator=g) * 4).log_softmax(-1)
    before = log_probs.clone()
    tokens, log_p = sample_from_log_probs(log_probs, torch.rand(500, 1, generator=g).clamp_min(TARGET_FLOOR))
    assert tokens.shape == log_p.shape == (500, 1)
    assert torch.equal(log_p, log_probs.gather(-1, tokens))
    assert torch.equal(log_probs, before)  # the input is not overwritten


@pytest.mark.parametrize(
    "v, how", [(8, "logits"), (300, "logits"), (512, "logits"), (8, "log_probs"), (64, "log_probs")]
)
def test_zero_probability_tokens_are_never_drawn(v, how):
    """-inf logits and logits 1000 below the max (exp underflows; the floor against
    slow denormals keeps them at <= 1.7e-38) are never drawn, even at u = 0 and at the
    largest float32 uniform, and wherever they sit in the row (first, last, inside a
    block of the two-level search)."""
    g = torch.Generator().manual_seed(v)
    rows = 4096
    logits = torch.randn(rows, v, generator=g)
    dead = torch.zeros(v, dtype=torch.bool)
    dead[[0, 1, v // 2, v // 2 + 1, v - 1]] = True
    logits[:, [0, v // 2]] = float("-inf")
    logits[:, [1, v // 2 + 1, v - 1]] = -1000.0
    uniforms = torch.rand(rows, generator=g)
    uniforms[:64] = 0.0
    uniforms[64:128] = 1.0 - 2.0**-24  # the largest float32 uniform
    tokens, log_p = draw(how, logits, uniforms)
    assert not bool(dead[tokens].any())
    assert bool(torch.isfinite(log_p).all())
    # u = 0 draws the first token of non-negligible probability
    first_live = (~dead).nonzero()[0, 0]
    assert bool((tokens[:64] == first_live).all())


@pytest.mark.parametrize("how", DRAWS)
def test_a_near_one_hot_row_draws_its_mode(how):
    logits = torch.full((10, 512), -200.0)
    logits[:, 37] = 0.0
    tokens, log_p = draw(how, logits, torch.linspace(0, 0.999, 10))
    assert tokens.tolist() == [37] * 10 and torch.allclose(log_p, torch.zeros(10))


# --------------------------------------------------------------------------- through the sampler


def fixed_backbone(v: int, n: int = 64, seed: int = 0) -> tuple[FixedLogits, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = (torch.randn(v, generator=g) * 1.5).expand(n, v).clone()
    u = (torch.randn(v, generator=g) * 1.5).expand(n, v).clone()
    return FixedLogits(c, u, grid=(8, n // 8)), c[0], u[0]


@pytest.mark.parametrize("v", [DENSE_MAX_CODEBOOK // 8, 512])  # every position / the masked rows only
def test_per_sample_tokens_follow_the_guided_tempered_distribution(v):
    bb, c, u = fixed_backbone(v)
    tau, s = 0.8, 2.5
    sampler = ConfidenceSampler(ConfidenceOptions(rng="per_sample"))
    sched = Scripted(lambda t, T: [tau, 0.0, 1.0, s])  # one step decodes every position
    counts = torch.zeros(v, dtype=torch.long)
    for k in range(25):
        traj = sampler.sample(bb, sched, ["p"] * 64, 1, torch.arange(64) + 64 * k)
        counts += torch.bincount(traj.final_tokens.flatten(), minlength=v)
    probs = torch.softmax((u + s * (c - u)) / tau, -1)
    assert counts.sum() == 25 * 64 * 64
    assert goodness_of_fit(counts, probs) > ALPHA
    assert goodness_of_fit(counts, torch.softmax(c / tau, -1)) < 1e-9  # not the conditional model alone


@pytest.mark.parametrize("v", [6, 96])  # every position / the masked rows only
def test_per_sample_and_shared_trajectories_have_one_distribution(v):
    """Over whole multi-step trajectories (re-masking by confidence with Gumbel noise),
    the per_sample draws and the shared ones (torch.multinomial, as aMUSEd draws) give
    the same distribution: of the final tokens, and of the tokens kept at step 0."""
    bb, _, _ = fixed_backbone(v, seed=1)
    sched = Scripted(lambda t, T: [1.0, 0.5, 1.0, 1.5])
    hist = {}
    for rng in ("per_sample", "shared"):
        sampler = ConfidenceSampler(ConfidenceOptions(rng=rng))
        final = torch.zeros(v, dtype=torch.long)
        kept = torch.zeros(v, dtype=torch.long)
        for k in range(60):
            seeds = torch.arange(32) + 32 * k + (0 if rng == "per_sample" else 100_000)
            traj = sampler.sample(bb, sched, ["p"] * 32, 3, seeds)
            final += torch.bincount(traj.final_tokens.flatten(), minlength=v)
            first = traj.tokens[:, 1][traj.filled[:, 0]]
            kept += torch.bincount(first, minlength=v + 1)[:v]
        hist[rng] = (final, kept)
    assert two_sample(hist["per_sample"][0], hist["shared"][0]) > ALPHA
    a, b = hist["per_sample"][1], hist["shared"][1]
    assert int(a.sum()) == int(b.sum())  # the same number of tokens is kept at step 0
    assert two_sample(a, b) > ALPHA
    # confidence re-masking keeps likely tokens: step 0's kept tokens are not the raw softmax
    probs = torch.softmax(bb.u[0] + 1.5 * (bb.c[0] - bb.u[0]), -1)
    assert goodness_of_fit(a, probs) < 1e-6


# --------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("v", [DENSE_MAX_CODEBOOK, DENSE_MAX_CODEBOOK + 1, 512])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_step_log_prob_agrees_with_the_full_reference(v, tau):
    g = torch.Generator().manual_seed(v)
    b, n = 3, 20
    c, u = torch.randn(b, n, v, generator=g) * 3, torch.randn(b, n, v, generator=g) * 3
    act = torch.tensor([[tau, 0.3, 1.0, 4.0], [tau, 0.3, 1.0, 0.0], [tau, 0.3, 1.0, 1.0]])
    filled = torch.rand(b, n, generator=g) < 0.4
    nxt = torch.where(filled, torch.randint(0, v, (b, n), generator=g), v)  # the mask id elsewhere
    want = filled_log_prob(guided_log_probs(c, u, act), nxt, filled)
    got = step_log_prob(c, u, act, nxt, filled)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
    # the rows helper is guided_logits at those rows, up to float32 rounding
    index = filled.reshape(-1).nonzero().squeeze(1)
    full = guided_logits(c, u, act).reshape(-1, v)
    assert torch.allclose(guided_rows(c, u, act, index), full[index], atol=1e-4, rtol=1e-5)
    assert torch.allclose(guided_rows(c, u, act), full, atol=1e-4, rtol=1e-5)


def test_step_log_prob_reads_strided_logits_and_passes_gradients():
    g = torch.Generator().manual_seed(0)
    b, n, v = 2, 12, 300
    raw = torch.randn(2 * b, v, n, generator=g).requires_grad_()
    logits = raw.permute(0, 2, 1)  # [2B, N, V] with the codebook strided, as a conv head may give
    act = torch.tensor([[1.0, 0.3, 1.0, 3.0]] * b)
    filled = torch.zeros(b, n, dtype=torch.bool)
    filled[0, [1, 5]] = True
    filled[1, 7] = True
    nxt = torch.where(filled, 4, v)
    lp = step_log_prob(logits[b:], logits[:b], act, nxt, filled)
    want = filled_log_prob(guided_log_probs(logits[b:], logits[:b], act), nxt, filled)
    assert torch.allclose(lp, want, atol=1e-5)
    lp.sum().backward()
    touched = raw.grad.abs().sum(1) > 0  # [2B, N]: only the filled positions, in both halves
    assert torch.equal(touched, torch.cat([filled, filled]))
