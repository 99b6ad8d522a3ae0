"""Re-mask functions Rev(o, t, S) of MaskGRPO, selectable by name (``remask`` option).

- ``random``: exactly ceil(t N) positions, uniformly without replacement
  (:func:`~mdmrl_plugins.maskgrpo.objective.seeded_mask`); the image branch's function.
- ``ar-fading``: the AR-like fading-out re-mask of the paper's Alg. 1 for text. Over
  the L_o positions of the completion, d = linspace(1, 0, L_o) and

      q_i = d_i (1 - t) L_o / sum(d)

  is the probability that position i **keeps** its token (the public code masks a
  position when a uniform draw exceeds q_i), so the mask probability 1 - q_i rises
  along the completion: the late, uncertain tokens are masked most. Positions are
  masked independently. Without clipping the expected masked fraction is exactly t.

Clipping: sum(d) = L_o / 2 (L_o >= 2), so the first position's q is 2 (1 - t), above 1
when t < 1/2. q is clipped to [0, 1] (as the public code clips it), which keeps those
positions always and lowers the expected kept fraction: the expected masked fraction
is then 1 - mean(min(q, 1)) > t (:func:`expected_masked_fraction`). For t >= 1/2 no
position is clipped; MaskGRPO's text levels lie in (gamma, 1) with gamma = 0.6.

Positions outside ``eligible`` (e.g. the prompt, in a layout that holds it) are never
masked; L_o counts the eligible positions of each row, in order. The masks are drawn
by a CPU generator seeded with ``mask_seed(seed, term, salt)``, so every policy (old,
new, reference) scores the same masked completion.
"""

from __future__ import annotations

import torch

from mdmrl_plugins.maskgrpo.objective import mask_seed, seeded_mask

REMASKS = ("random", "ar-fading")


def fading_keep_probabilities(length: int, level: float) -> torch.Tensor:
    """q_i = min(d_i (1 - t) L_o / sum(d), 1), d = linspace(1, 0, L_o): float64 [L_o],
    the probability that position i of the completion keeps its token at mask level t."""
    if length < 1:
        return torch.zeros(0, dtype=torch.float64)
    d = torch.linspace(1.0, 0.0, length, dtype=torch.float64)
    return (d * (1.0 - level) * length / d.sum()).clamp(0.0, 1.0)


def expected_masked_fraction(length: int, level: float) -> float:
    """E[masked positions] / L_o of the ar-fading re-mask: 1 - mean(q); t exactly when
    no q is clipped (t >= 1/2), more below."""
    q = fading_keep_probabilities(length, level)
    return float(1.0 - q.mean()) if length else 0.0


def eligible_positions(eligible: torch.Tensor | None, rows: int, num_tokens: int) -> list[torch.Tensor]:
    """The positions of each row that may be masked, in order, long [L_o] per row:
    every one of the N when ``eligible`` (bool [B, N]) is None."""
    if eligible is None:
        return [torch.arange(num_tokens)] * rows
    allowed = eligible.bool().cpu()
    return [allowed[i].nonzero().squeeze(1) for i in range(rows)]


def ar_fading_mask(
    seeds: torch.Tensor,
    term: int,
    level: float,
    num_tokens: int,
    salt: int = 0,
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rev(o, t_j, S_j) by Alg. 1 for each row b: a position is masked when a uniform
    from the generator seeded with ``mask_seed(seeds[b], term, salt)`` is at least its
    keep probability. eligible: bool [B, N] (None: every position).

    Returns (masked bool [B, N] on the CPU, the expected masked fraction of the N
    positions float32 [B]: the ELBO's normaliser)."""
    b = seeds.numel()
    masked = torch.zeros(b, num_tokens, dtype=torch.bool)
    expected = torch.zeros(b, dtype=torch.float32)
    for i, (s, where) in enumerate(zip(seeds.tolist(), eligible_positions(eligible, b, num_tokens))):
        length = where.numel()
        g = torch.Generator().manual_seed(mask_seed(s, term, salt))
        u = torch.rand(length, generator=g, dtype=torch.float64)
        masked[i, where] = u >= fading_keep_probabilities(length, level)
        expected[i] = expected_masked_fraction(length, level) * length / num_tokens
    return masked, expected


def random_mask(
    seeds: torch.Tensor,
    term: int,
    level: float,
    num_tokens: int,
    salt: int = 0,
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``random`` re-mask: :func:`seeded_mask` over the eligible positions of each
    row (exactly ceil(t L_o) of them, kept in [1, L_o - 1]). Returns (masked bool
    [B, N] on the CPU, the realised masked fraction of the N positions float32 [B])."""
    if eligible is None:
        masked = seeded_mask(seeds, term, level, num_tokens, salt)
    else:
        masked = torch.zeros(seeds.numel(), num_tokens, dtype=torch.bool)
        for i, where in enumerate(eligible_positions(eligible, seeds.numel(), num_tokens)):
            masked[i, where] = seeded_mask(seeds[i : i + 1], term, level, where.numel(), salt)[0]
    return masked, masked.float().mean(1)


def remask(
    name: str,
    seeds: torch.Tensor,
    term: int,
    level: float,
    num_tokens: int,
    salt: int = 0,
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The re-mask function ``name`` (one of :data:`REMASKS`): (masked bool [B, N],
    the fraction the ELBO divides by, float32 [B])."""
    if name == "random":
        return random_mask(seeds, term, level, num_tokens, salt, eligible)
    if name == "ar-fading":
        return ar_fading_mask(seeds, term, level, num_tokens, salt, eligible)
    raise ValueError(f"unknown re-mask {name!r}; expected one of {REMASKS}")
