"""The LLaDA architecture, written in this project, and its checkpoint format.

LLaDA (Nie et al., 2025) is a masked diffusion language model built from LLaMA-style
blocks without a causal mask. One block of the published ``block_type = "llama"``
configuration:

    h = x + attn_out(Attention(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),  n = attn_norm(x)
    y = h + ff_out(silu(ff_proj(m)) * up_proj(m)),                             m = ff_norm(h)

with RMSNorm (computed in float32, weight applied in the model dtype), rotary position
embeddings over the whole sequence (the "rotate half" form, computed in float32),
bidirectional scaled dot-product attention (grouped keys and values when
``n_kv_heads < n_heads``) and no biases. The model embeds tokens with ``wte``, runs the
blocks, normalises with ``ln_f`` and projects to the vocabulary with ``ff_out`` (or
with ``wte``'s weight when ``weight_tying``).

The module tree mirrors the published checkpoint's parameter names, so its
``state_dict`` keys are the checkpoint's keys:

    model.transformer.wte.weight                                 [embedding_size, d_model]
    model.transformer.blocks.{i}.attn_norm.weight                [d_model]
    model.transformer.blocks.{i}.{q,k,v}_proj.weight             [heads * head_dim, d_model]
    model.transformer.blocks.{i}.attn_out.weight                 [d_model, d_model]
    model.transformer.blocks.{i}.ff_norm.weight                  [d_model]
    model.transformer.blocks.{i}.{ff,up}_proj.weight             [mlp_hidden_size, d_model]
    model.transformer.blocks.{i}.ff_out.weight                   [d_model, mlp_hidden_size]
    model.transformer.ln_f.weight                                [d_model]
    model.transformer.ff_out.weight                              [embedding_size, d_model]

A checkpoint folder holds ``config.json`` (the published field names, read here as
plain JSON: no code from the folder is run) and the weights as ``model.safetensors``
or as shards listed in ``model.safetensors.index.json`` (``{"metadata": {"total_size":
bytes}, "weight_map": {key: shard file}}``). :func:`load_weights` reads either;
:func:`save_checkpoint` writes the sharded form. See docs/text.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mdmrl.errors import UserError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: The published model's ``model_type`` and ``architectures`` (kept in saved configs).
MODEL_TYPE = "llada"
ARCHITECTURES = ["LLaDAModelLM"]

#: Values of config.json fields this implementation supports (field -> allowed values);
#: LLaDA-8B-Base and -Instruct use the first of each.
SUPPORTED: dict[str, tuple] = {
    "block_type": ("llama",),
    "activation_type": ("silu",),
    "layer_norm_type": ("rms",),
    "rope": (True,),
    "alibi": (False,),
    "attention_layer_norm": (False,),
    "block_group_size": (1,),
    "include_bias": (False,),
    "include_qkv_bias": (False, None),
    "bias_for_layer_norm": (False, None),
    "layer_norm_with_affine": (True,),
}


@dataclass
class LLaDAConfig:
    """The architecture fields of a LLaDA ``config.json`` (the published names).

    The defaults are GSAI-ML/LLaDA-8B-Instruct's values."""

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = 32
    n_layers: int = 32
    mlp_hidden_size: int | None = 12288
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    scale_logits: bool = False
    input_emb_norm: bool = False
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int | None = 126081
    block_type: str = "llama"
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    rope: bool = True
    alibi: bool = False
    attention_layer_norm: bool = False
    block_group_size: int = 1
    include_bias: bool = False
    include_qkv_bias: bool | None = False
    bias_for_layer_norm: bool | None = False
    layer_norm_with_affine: bool = True

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @property
    def vocab_rows(self) -> int:
        """Rows of ``wte`` and ``ff_out``: ``embedding_size`` when set, else ``vocab_size``."""
        return self.embedding_size or self.vocab_size

    def problems(self) -> list[str]:
        """What this implementation cannot run, one ``field: message`` per problem."""
        out = [
            f"{name}: {getattr(self, name)!r} is not supported (supported: {', '.join(map(repr, allowed))})"
            for name, allowed in SUPPORTED.items()
            if getattr(self, name) not in allowed
        ]
        if self.d_model % self.n_heads:
            out.append(f"d_model: {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            out.append(f"n_kv_heads: {self.kv_heads} does not divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            out.append(f"d_model / n_heads = {self.head_dim} must be even (rotary embeddings)")
        if self.vocab_rows < self.vocab_size:
            out.append(f"embedding_size: {self.embedding_size} is smaller than vocab_size {self.vocab_size}")
        if not 0 <= self.mask_token_id < self.vocab_rows:
            out.append(f"mask_token_id: {self.mask_token_id} is outside the {self.vocab_rows} embeddings")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLaDAConfig:
        """The known fields of a config.json dict (others, e.g. ``auto_map``, are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict with the published layout's bookkeeping fields."""
        return {"architectures": list(ARCHITECTURES), "model_type": MODEL_TYPE, **asdict(self)}


def read_config(folder: Path) -> LLaDAConfig:
    """The :class:`LLaDAConfig` of ``folder/config.json``; UserError (one line naming
    the file) when it is unreadable or describes something this implementation cannot run."""
    path = Path(folder) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the LLaDA config ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a LLaDA config is a JSON object")
    try:
        config = LLaDAConfig.from_dict(data)
    except TypeError as exc:
        raise UserError(f"{path}: {exc}") from None
    problems = config.problems()
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return config


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) in float32, cast back, times ``weight``."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = x.float()
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rotary_tables(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(cos, sin) float32 [length, head_dim] of positions 0..length-1: frequencies
    theta^(-2i / head_dim), each repeated for the two halves of a head."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, hd] (in float32) by the position tables [S, hd]: x cos +
    rotate_half(x) sin, rotate_half(x) = cat(-x2, x1) of the two halves."""
    with torch.autocast(x.device.type, enabled=False):
        y = x.float()
        x1, x2 = y.chunk(2, dim=-1)
        return (y * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """One bidirectional LLaMA-style block (module names as in the checkpoint)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, kv = config.d_model, config.kv_heads * config.head_dim
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.hidden_size, bias=False)
        self.ff_out = nn.Linear(config.hidden_size, d, bias=False)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """x [B, S, D]; key_mask bool [B, 1, 1, S] (True = attended) or None."""
        b, s, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
        h = x + self.attn_out(att.transpose(1, 2).reshape(b, s, -1))
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class _Transformer(nn.Module):
    """Holds ``transformer`` (a ModuleDict), so that keys read ``model.transformer...``."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        parts: dict[str, nn.Module] = {
            "wte": nn.Embedding(config.vocab_rows, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            parts["ff_out"] = nn.Linear(config.d_model, config.vocab_rows, bias=False)
        self.transformer = nn.ModuleDict(parts)


class LLaDAModel(nn.Module):
    """The LLaDA network: token embeddings -> blocks -> ln_f -> vocabulary logits."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.model = _Transformer(config)
        self.gradient_checkpointing = False

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model.transformer

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) linear and embedding weights, unit norm weights."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids long [B, S] -> embeddings [B, S, D] (``wte``; no scaling here)."""
        return self.transformer.wte(ids)

    def hidden_states(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings [B, S, D] (from :meth:`embed`) -> final hidden states after ``ln_f``
        [B, S, D]. key_mask: bool [B, S], True where a position may be attended (padding
        False), or None for all. Positions are 0..S-1; padding shifts the absolute
        positions of the real tokens but not their distances, which is all RoPE sees."""
        cfg = self.config
        if cfg.input_emb_norm:
            x = x * (cfg.d_model**0.5)
        s = x.shape[1]
        if s > cfg.max_sequence_length:
            raise ValueError(f"sequence of {s} tokens exceeds max_sequence_length {cfg.max_sequence_length}")
        cos, sin = rotary_tables(s, cfg.head_dim, cfg.rope_theta, x.device)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        for block in self.transformer.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, cos, sin, use_reentrant=False)
            else:
                x = block(x, mask, cos, sin)
        return self.transformer.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., D] -> vocabulary logits [..., embedding_size]."""
        t = self.transformer
        out = F.linear(hidden, t.wte.weight) if self.config.weight_tying else t.ff_out(hidden)
        return out * (1.0 / math.sqrt(self.config.d_model)) if self.config.scale_logits else out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """LLaDA's plain forward: ids long [B, S] -> logits [B, S, V] (attention_mask:
        bool/0-1 [B, S], 0 = padding not attended)."""
        mask = None if attention_mask is None else attention_mask.bool()
        return self.logits(self.hidden_states(self.embed(input_ids), mask))


# --------------------------------------------------------------------------- checkpoints


def weight_files(folder: Path) -> list[Path] | None:
    """The safetensors files of a checkpoint folder: the shards named by
    ``model.safetensors.index.json``, else ``model.safetensors``; None when neither
    exists. UserError when the index is unreadable."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            shards = sorted(set(data["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index}: not a safetensors index with a weight_map ({exc})") from None
        return [folder / s for s in shards]
    single = folder / SINGLE_FILE
    return [single] if single.is_file() else None


def load_weights(model: LLaDAModel, files: list[Path], device: torch.device | str = "cpu") -> None:
    """Load every tensor of ``files`` into ``model`` (which may live on the meta device:
    tensors are assigned, not copied), then check that each parameter was given
    exactly once. UserError (one line, naming the file) on a missing shard, a missing
    or unknown key, or a shape that does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    expected = set(model.state_dict())
    seen: set[str] = set()
    for path in files:
        if not path.is_file():
            raise UserError(f"{path}: shard listed in the index is missing")
        try:
            tensors = load_file(str(path), device=str(device))
        except (OSError, SafetensorError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
        unknown = sorted(set(tensors) - expected)
        if unknown:
            raise UserError(
                f"{path}: {len(unknown)} tensor(s) that a LLaDA model of this config.json does not have, "
                f"e.g. {unknown[0]!r}"
            )
        try:
            model.load_state_dict(tensors, strict=False, assign=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise UserError(f"{path}: does not fit the config.json ({first})") from None
        seen.update(tensors)
    missing = sorted(expected - seen)
    if missing:
        raise UserError(
            f"{files[0].parent}: the checkpoint lacks {len(missing)} tensor(s) of this config.json, "
            f"e.g. {missing[0]!r}"
        )


def save_checkpoint(model: LLaDAModel, folder: Path | str, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write ``config.json`` and the weights, in shards of at most ``max_shard_bytes``
    (a tensor larger than that gets a shard of its own) named
    ``model-0000i-of-0000n.safetensors``, with ``model.safetensors.index.json``.
    Returns the shard paths."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = tensor
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        save_file(group, str(folder / name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": {k: name for name, group in zip(names, groups) for k in group},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return [folder / n for n in names]


def published_structure(config: LLaDAConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a LLaDA checkpoint of ``config`` (LLaDA-8B's by
    default), written down from the published parameter names (see the module
    docstring); independent of :class:`LLaDAModel`, which the tests compare to it."""
    c = config or LLaDAConfig()
    d, kv, hidden, rows = c.d_model, c.kv_heads * c.head_dim, c.hidden_size, c.vocab_rows
    table: dict[str, tuple[int, ...]] = {"model.transformer.wte.weight": (rows, d)}
    block = {
        "attn_norm.weight": (d,),
        "ff_norm.weight": (d,),
        "q_proj.weight": (d, d),
        "k_proj.weight": (kv, d),
        "v_proj.weight": (kv, d),
        "attn_out.weight": (d, d),
        "ff_proj.weight": (hidden, d),
        "up_proj.weight": (hidden, d),
        "ff_out.weight": (d, hidden),
    }
    for i in range(c.n_layers):
        table.update({f"model.transformer.blocks.{i}.{k}": v for k, v in block.items()})
    table["model.transformer.ln_f.weight"] = (d,)
    if not c.weight_tying:
        table["model.transformer.ff_out.weight"] = (rows, d)
    return table
