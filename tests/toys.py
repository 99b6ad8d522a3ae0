"""Tiny, fast implementations of the parts for tests (not registered as plug-ins)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from mdmrl.interfaces import Backbone, BuildContext, SchedulePolicy
from mdmrl.trajectory import NUM_ACTIONS, BackboneOutput, Conditioning


@dataclass
class TinyOptions:
    codebook_size: int = 5
    height: int = 3
    width: int = 4
    dim: int = 8
    seed: int = 0


class TinyBackbone(Backbone):
    """A one-layer bidirectional model: token + position embeddings, a prompt vector
    from a hash of its words, one attention layer, a linear head. Deterministic given
    ``seed``; a few hundred parameters."""

    name = "tiny"
    Options = TinyOptions

    def __init__(self, options: TinyOptions | None = None):
        super().__init__()
        o = options or TinyOptions()
        self.codebook_size = o.codebook_size
        self.mask_token_id = o.codebook_size
        self.grid_shape = (o.height, o.width)
        self.feature_dim = o.dim
        g = torch.Generator().manual_seed(o.seed)
        n = o.height * o.width
        self.tok = nn.Parameter(torch.randn(o.codebook_size + 1, o.dim, generator=g) * 0.5)
        self.pos = nn.Parameter(torch.randn(n, o.dim, generator=g) * 0.5)
        self.words = nn.Parameter(torch.randn(64, o.dim, generator=g) * 0.5)
        self.time = nn.Parameter(torch.randn(o.dim, generator=g) * 0.5)
        self.attn = nn.MultiheadAttention(
            o.dim, 2, batch_first=True, bias=False
        )  # a key bias has zero gradient
        self.head = nn.Linear(o.dim, o.codebook_size)
        with torch.no_grad():
            for p in list(self.attn.parameters()) + list(self.head.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    @classmethod
    def from_options(cls, options, ctx: BuildContext):
        return cls(options)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        rows = []
        for p in prompts:
            ids = [zlib.crc32(w.encode()) % 63 + 1 for w in p.split()] or [0]
            rows.append(self.words[torch.tensor(ids)].mean(0))
        hidden = torch.stack(rows)[:, None, :]
        return Conditioning(hidden=hidden, pooled=hidden[:, 0])

    def forward(self, tokens, cond, timestep):
        x = self.tok[tokens] + self.pos[None] + cond.hidden + timestep[:, None, None] * self.time
        h, _ = self.attn(x, x, x, need_weights=False)
        feats = x + h
        return BackboneOutput(logits=self.head(feats).float(), features=feats)

    def decode(self, tokens):
        b = tokens.shape[0]
        h, w = self.grid_shape
        grey = tokens.float().view(b, 1, h, w) / max(self.codebook_size - 1, 1)
        return grey.expand(b, 3, h, w).contiguous()


class Scripted(SchedulePolicy):
    """A fixed schedule whose action at step t of T is ``fn(t, T)``, K numbers, the same
    for every row."""

    name = "scripted"

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def act(self, step, num_steps, batch_size, features, generator, deterministic=False):
        a = (
            torch.tensor(self.fn(step, num_steps), dtype=torch.float32)
            .expand(batch_size, NUM_ACTIONS)
            .clone()
        )
        return a, a.clone(), torch.zeros(batch_size)

    def log_prob(self, step, num_steps, features, raw_actions):
        return torch.zeros(raw_actions.shape[0])


class FixedLogits(Backbone):
    """Hand-made backbone: the same logits whatever the tokens; ``cond`` [N, V] for
    real prompts and ``uncond`` [N, V] for the empty one (hidden 1 vs 0)."""

    name = "fixed-logits"

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor | None = None, grid=None):
        super().__init__()
        n, v = cond.shape
        self.codebook_size, self.mask_token_id = v, v
        self.grid_shape = grid or (1, n)
        self.feature_dim = 2
        self.register_buffer("c", cond.float())
        self.register_buffer("u", (cond if uncond is None else uncond).float())

    def encode_prompts(self, prompts):
        return Conditioning(hidden=torch.tensor([[[1.0 if p else 0.0]] for p in prompts]))

    def forward(self, tokens, cond, timestep):
        is_cond = cond.hidden[:, 0, 0] > 0
        logits = torch.where(is_cond[:, None, None], self.c, self.u)
        return BackboneOutput(logits=logits, features=torch.zeros(*tokens.shape, 2))

    def decode(self, tokens):
        return tokens.float()[:, None, None].expand(-1, 3, 1, -1)
