"""The Meissonic transformer, written for this project, loading the published weights.

Meissonic (Bai et al., 2024) predicts the VQ tokens of a 1024x1024 image (a 64x64 grid)
from a partly masked grid and a CLIP prompt. One forward pass (B batch, H x W token
grid, L = 77 text tokens, D = heads * head_dim = 1024 for the published model):

1. ``embed``: token ids [B, H, W] (vocab 8256; mask id 8255) -> embedding -> RMSNorm ->
   1x1 conv -> [B, D, H, W];
2. ``down_block``: RMSNorm + 2x2 stride-2 conv -> [B, D, H/2, W/2], flattened to
   [B, S, D] (S = H W / 4) -> ``project_to_hidden_norm`` -> ``project_to_hidden``;
3. text: CLIP penultimate states [B, L, 1024] -> ``context_embedder`` ->
   ``encoder_proj_layer_norm``;
4. conditioning vector ``temb`` [B, D]: the five micro-conditions (width, height, crop
   x, crop y, aesthetic score) each get a 256-wide sinusoidal embedding, are
   concatenated after the pooled CLIP embedding and mapped by ``cond_embed``; the
   result goes through ``time_text_embed.text_embedder`` and is added to the timestep
   embedding (``time_text_embed.timestep_embedder`` of sinusoid(1000 * timestep));
5. ``transformer_blocks``: dual-stream MMDiT blocks (text and image streams with
   their own weights, one joint attention over [text; image]);
6. ``single_transformer_blocks``: single-stream blocks over the concatenation
   [text; image] [B, L + S, D];
7. the image part -> ``project_from_hidden_norm`` -> ``project_from_hidden`` ->
   [B, D, H/2, W/2] -> ``up_block`` (RMSNorm + 2x2 stride-2 transposed conv) ->
   [B, D, H, W] = the *features* -> ``mlm_layer`` (1x1 conv, RMSNorm, 1x1 conv) ->
   logits [B, codebook_size, H, W].

Attention uses rotary position embeddings over 3-axis position ids: text tokens have
ids (0, 0, 0) (so RoPE leaves them unchanged), image token (r, c) of the grid the
transformer sees (after the down block) has ids (0, r, c). AdaLN modulation of every
block reads ``temb``.

Module names and parameter shapes equal those of the published checkpoint
(``MeissonFlow/Meissonic``, ``transformer/``), so ``from_pretrained`` loads it
unchanged; the config keys are the published ``transformer/config.json`` keys. The
expected key table is in :mod:`mdmrl_plugins.meissonic.structure`; docs/meissonic.md
says how it was derived.

``timestep`` follows the convention of Meissonic's pipeline: the scheduler timestep
(``num_steps - 1 - step`` for a ``num_steps``-step run), multiplied by 1000 inside the
model before the sinusoidal embedding. :mod:`mdmrl_plugins.meissonic.backbone` maps the
masked fraction to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

#: Constants of the published architecture that are not config keys.
NORM_EPS = 1e-6
MICRO_COND_ENCODE_DIM = 256  # sinusoid width per micro-condition
NUM_MICRO_CONDS = 5  # width, height, crop x, crop y, aesthetic score
MICRO_COND_EMBED_DIM = NUM_MICRO_CONDS * MICRO_COND_ENCODE_DIM  # 1280
TIMESTEP_PROJ_DIM = 256  # sinusoid width of the timestep
TIMESTEP_SCALE = 1000.0  # the model multiplies the timestep it is given by this
ROPE_THETA = 10000.0
MLP_RATIO = 4


# ------------------------------------------------------------------ small pieces


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Cosine-first sinusoidal features of scalars.

    values: float [M] -> float32 [M, dim], ``[cos(v * f_k), sin(v * f_k)]`` with
    ``f_k = max_period ** (-k / (dim / 2))``, k = 0 .. dim/2 - 1 (the layout diffusers
    calls ``flip_sin_to_cos=True, downscale_freq_shift=0``).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    angles = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learned per-channel ``weight``.

    Statistics in float32; the result takes the weight's dtype when that is half
    precision, else the input's.
    """

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float [..., dim] -> same shape."""
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class MLPEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (``linear_1``, ``linear_2``); maps a vector to width D."""

    def __init__(self, in_dim: int, dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_dim] -> [B, dim]."""
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """``temb = timestep_embedder(sinusoid(timestep)) + text_embedder(cond)``.

    ``cond`` is the output of the model's ``cond_embed`` (pooled text + micro-conditions),
    of width D, so ``text_embedder`` reads D channels (the published config has
    ``pooled_projection_dim`` = D = 1024, and there the two are the same).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedding(TIMESTEP_PROJ_DIM, dim)
        self.text_embedder = MLPEmbedding(dim, dim)

    def forward(self, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """timestep float [B] (already scaled by 1000), cond [B, D] -> temb [B, D]."""
        t = sinusoidal_embedding(timestep, TIMESTEP_PROJ_DIM).to(cond.dtype)
        return self.timestep_embedder(t) + self.text_embedder(cond)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over multi-axis integer position ids (no parameters).

    Axis a of the ids uses ``axes_dims[a]`` channels of every attention head; the axes'
    channels are concatenated, so ``sum(axes_dims)`` equals the head width. Within an
    axis, channel pair (2k, 2k+1) rotates by angle ``pos * theta ** (-2k / dim_a)``.
    """

    def __init__(self, axes_dims: tuple[int, ...], theta: float = ROPE_THETA):
        super().__init__()
        self.axes_dims = tuple(int(d) for d in axes_dims)
        self.theta = theta

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [S, A] -> (cos, sin), each float32 [S, head_dim], pairs interleaved."""
        freq_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
        pos = ids.to(freq_dtype)
        cos, sin = [], []
        for axis, dim in enumerate(self.axes_dims):
            inv = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=freq_dtype, device=ids.device) / dim)
            angles = pos[:, axis, None] * inv[None]  # [S, dim/2]
            cos.append(angles.cos().repeat_interleave(2, dim=-1))
            sin.append(angles.sin().repeat_interleave(2, dim=-1))
        return torch.cat(cos, dim=-1).float(), torch.cat(sin, dim=-1).float()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [B, heads, S, head_dim] by rope (cos, sin) [S, head_dim]."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope) -> torch.Tensor:
    """RoPE then scaled dot-product attention; q/k/v [B, heads, S, hd] -> [B, S, heads * hd]."""
    q, k = apply_rotary(q, rope), apply_rotary(k, rope)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2).to(q.dtype)


# ------------------------------------------------------------------ blocks


class AdaLayerNormZero(nn.Module):
    """LayerNorm (no affine) modulated by temb: returns the normed input and the
    gate/shift/scale of the block's MLP branch (``linear`` emits 6 D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        """x [B, S, D], temb [B, D] -> (x_mod [B, S, D], gate_attn, shift_mlp, scale_mlp, gate_mlp each [B, D])."""
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(6, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], gate, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """LayerNorm (no affine) modulated by temb for a single-stream block (``linear`` emits 3 D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        """x [B, S, D], temb [B, D] -> (x_mod [B, S, D], gate [B, D])."""
        shift, scale, gate = self.linear(F.silu(temb)).chunk(3, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], gate


class GeluProjection(nn.Module):
    """Linear (``proj``) followed by tanh-approximated GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """D -> 4 D (GELU-tanh) -> D, stored as ``net.0.proj`` and ``net.2`` (``net.1`` is dropout 0)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList(
            [GeluProjection(dim, MLP_RATIO * dim), nn.Dropout(0.0), nn.Linear(MLP_RATIO * dim, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class JointAttention(nn.Module):
    """Attention of a dual-stream block: image projections ``to_q/k/v``, text
    projections ``add_q/k/v_proj``, per-head RMSNorm of queries and keys, one softmax
    over [text; image], then ``to_out.0`` (image) and ``to_add_out`` (text)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, heads, S, hd]

    def forward(self, image: torch.Tensor, text: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, S, D], text [B, L, D], rope over L + S positions -> (image [B, S, D], text [B, L, D])."""
        text_q = self.norm_added_q(self._heads(self.add_q_proj(text)))
        text_k = self.norm_added_k(self._heads(self.add_k_proj(text)))
        text_v = self._heads(self.add_v_proj(text))
        q = self.norm_q(self._heads(self.to_q(image)))
        k = self.norm_k(self._heads(self.to_k(image)))
        v = self._heads(self.to_v(image))
        out = attention(torch.cat([text_q, q], 2), torch.cat([text_k, k], 2), torch.cat([text_v, v], 2), rope)
        length = text.shape[1]
        text_out, image_out = out[:, :length], out[:, length:]
        return self.to_out[1](self.to_out[0](image_out)), self.to_add_out(text_out)


class SelfAttention(nn.Module):
    """Attention of a single-stream block: ``to_q/k/v`` with per-head RMSNorm of queries
    and keys, and no output projection (the block's ``proj_out`` follows)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        """x [B, S, D] -> [B, S, heads * hd]."""

        def heads(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = self.norm_q(heads(self.to_q(x))), self.norm_k(heads(self.to_k(x))), heads(self.to_v(x))
        return attention(q, k, v, rope)


def _clip_half(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DualStreamBlock(nn.Module):
    """MMDiT block: text and image streams with separate AdaLN, attention projections
    and MLPs, joined in one attention. Gated residuals on both streams."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.ff_context = FeedForward(dim)

    def forward(self, image: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, rope):
        """image [B, S, D], text [B, L, D], temb [B, D] -> (text, image), same shapes."""
        x, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(image, temb)
        c, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(text, temb)
        attn_image, attn_text = self.attn(x, c, rope)

        image = image + gate[:, None] * attn_image
        x = self.norm2(image) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        image = image + gate_mlp[:, None] * self.ff(x)

        text = text + c_gate[:, None] * attn_text
        c = self.norm2_context(text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        text = _clip_half(text + c_gate_mlp[:, None] * self.ff_context(c))
        return text, image


class SingleStreamBlock(nn.Module):
    """Single-stream block over [text; image]: attention and a GELU MLP in parallel
    from one AdaLN, concatenated, projected by ``proj_out``, gated residual."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, MLP_RATIO * dim)
        self.proj_out = nn.Linear(dim + MLP_RATIO * dim, dim)
        self.attn = SelfAttention(dim, heads, head_dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope) -> torch.Tensor:
        """x [B, L + S, D], temb [B, D] -> same shape."""
        h, gate = self.norm(x, temb)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        out = self.proj_out(torch.cat([self.attn(h, rope), mlp], dim=2))
        return _clip_half(x + gate[:, None] * out)


class TokenEmbedding(nn.Module):
    """Token ids -> ``embeddings`` -> RMSNorm (``layer_norm``) -> 1x1 ``conv`` (no bias)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, dim)
        self.layer_norm = RMSNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids long [B, H, W] -> [B, D, H, W]."""
        return self.conv(self.layer_norm(self.embeddings(ids)).permute(0, 3, 1, 2))


class NormConv(nn.Module):
    """Channel RMSNorm (``norm``) then a 2x2 stride-2 ``conv``: a convolution halving
    the grid, or a transposed convolution doubling it. No bias."""

    def __init__(self, dim: int, transposed: bool):
        super().__init__()
        self.norm = RMSNorm(dim)
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = conv(dim, dim, kernel_size=2, stride=2, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D, H, W] -> [B, D, H/2, W/2] (conv) or [B, D, 2H, 2W] (transposed)."""
        return self.conv(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class DownBlock(nn.Module):
    """The feature-compression layer before the transformer (``downsample``, 64x64 -> 32x32)."""

    def __init__(self, dim: int):
        super().__init__()
        self.downsample = NormConv(dim, transposed=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x)


class UpBlock(nn.Module):
    """The feature-decompression layer after the transformer (``upsample``, 32x32 -> 64x64)."""

    def __init__(self, dim: int):
        super().__init__()
        self.upsample = NormConv(dim, transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class MlmHead(nn.Module):
    """``conv1`` (1x1) -> RMSNorm (``layer_norm``) -> ``conv2`` (1x1) to codebook logits. No bias."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.layer_norm = RMSNorm(dim)
        self.conv2 = nn.Conv2d(dim, codebook_size, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D, H, W] -> logits [B, codebook_size, H, W]."""
        x = self.layer_norm(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(x)


# ------------------------------------------------------------------ model


@dataclass
class MeissonicTransformerOutput:
    """logits: [B, codebook_size, H, W]; features: [B, D, H, W], the up-block output
    that the MLM head reads (token resolution)."""

    logits: torch.Tensor
    features: torch.Tensor


def image_position_ids(height: int, width: int, device=None) -> torch.Tensor:
    """RoPE ids of an image grid: float [height * width, 3], row-major, (0, row, col)."""
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, device=device, dtype=torch.float32)[None, :].expand(height, width)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(height * width, 3)


class MeissonicTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Meissonic's masked-token transformer (see the module docstring for the layout).

    Config keys are those of the published ``transformer/config.json``:

    num_layers / num_single_layers: dual-stream / single-stream blocks (14 / 28).
    num_attention_heads, attention_head_dim: D = heads * head_dim (8 * 128 = 1024).
    joint_attention_dim: width of the text hidden states (CLIP-ViT-H-14: 1024).
    pooled_projection_dim: width of the pooled text embedding (1024).
    axes_dims_rope: RoPE channels per id axis; sums to attention_head_dim.
    vocab_size: input token ids, mask id = vocab_size - 1 (8256, mask 8255).
    codebook_size: VQ codebook size = number of logits (8192).
    downsample / upsample: the 2x feature compression around the transformer (both
        True for the 1024 model; they must agree).
    patch_size, in_channels: stored, unused by the published code (patch_size must be 1).
    guidance_embeds: must be False (the published model has no guidance embedding).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DualStreamBlock", "SingleStreamBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 14,
        num_single_layers: int = 28,
        attention_head_dim: int = 128,
        num_attention_heads: int = 8,
        joint_attention_dim: int = 1024,
        pooled_projection_dim: int = 1024,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
        vocab_size: int = 8256,
        codebook_size: int = 8192,
        downsample: bool = True,
        upsample: bool = True,
    ):
        super().__init__()
        if guidance_embeds:
            raise ValueError("guidance_embeds=True is not part of the published Meissonic model")
        if patch_size != 1:
            raise ValueError(f"patch_size must be 1, got {patch_size}")
        if bool(downsample) != bool(upsample):
            raise ValueError("downsample and upsample must both be true or both false")
        if sum(axes_dims_rope) != attention_head_dim or any(d % 2 for d in axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {tuple(axes_dims_rope)} must be even and sum to {attention_head_dim}"
            )
        if vocab_size <= codebook_size:
            raise ValueError(f"vocab_size {vocab_size} must exceed codebook_size {codebook_size} (mask id)")
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim

        self.pos_embed = RotaryEmbedding(tuple(axes_dims_rope))
        self.time_text_embed = TimeTextEmbedding(dim)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            DualStreamBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_single_layers)
        )
        self.embed = TokenEmbedding(vocab_size, dim)
        self.mlm_layer = MlmHead(dim, codebook_size)
        self.cond_embed = MLPEmbedding(MICRO_COND_EMBED_DIM + pooled_projection_dim, dim, bias=False)
        self.encoder_proj_layer_norm = RMSNorm(dim)
        self.project_to_hidden_norm = RMSNorm(dim)
        self.project_to_hidden = nn.Linear(dim, dim, bias=False)
        self.project_from_hidden_norm = RMSNorm(dim)
        self.project_from_hidden = nn.Linear(dim, dim, bias=False)
        self.down_block = DownBlock(dim) if downsample else None
        self.up_block = UpBlock(dim) if upsample else None
        self.gradient_checkpointing = False

    @property
    def mask_token_id(self) -> int:
        return int(self.config.vocab_size) - 1

    def conditioning(
        self, pooled: torch.Tensor, micro_conds: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """The AdaLN input temb [B, D].

        pooled: [B, pooled_projection_dim] pooled text embedding.
        micro_conds: [B, 5] (width, height, crop x, crop y, aesthetic score).
        timestep: [B] or [1], the pipeline's scheduler timestep (scaled by 1000 here).
        """
        b = pooled.shape[0]
        micro = sinusoidal_embedding(micro_conds.flatten(), MICRO_COND_ENCODE_DIM).reshape(b, -1)
        dtype = self.context_embedder.weight.dtype
        cond = self.cond_embed(torch.cat([pooled.to(dtype), micro.to(dtype)], dim=1))
        t = timestep.float().reshape(-1) * TIMESTEP_SCALE
        return self.time_text_embed(t, cond)

    def _run(self, block: nn.Module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        micro_conds: torch.Tensor,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
    ) -> MeissonicTransformerOutput:
        """Logits over the codebook for every grid position.

        hidden_states: long [B, H, W] token ids (mask = vocab_size - 1).
        encoder_hidden_states: [B, L, joint_attention_dim] text states (all L attended).
        pooled_projections: [B, pooled_projection_dim].
        timestep: float/long [B] or [1], Meissonic's pipeline timestep.
        micro_conds: [B, 5].
        img_ids / txt_ids: RoPE ids [S, 3] / [L, 3]; default: (0, row, col) over the
            grid after the down block / all zeros.
        Returns :class:`MeissonicTransformerOutput`.
        """
        dtype = self.context_embedder.weight.dtype
        temb = self.conditioning(pooled_projections, micro_conds, timestep)
        text = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states.to(dtype)))

        x = self.embed(hidden_states)
        if self.down_block is not None:
            x = self.down_block(x)
        b, d, h, w = x.shape
        x = self.project_to_hidden(self.project_to_hidden_norm(x.permute(0, 2, 3, 1).reshape(b, h * w, d)))

        if img_ids is None:
            img_ids = image_position_ids(h, w, device=x.device)
        if txt_ids is None:
            txt_ids = torch.zeros(text.shape[1], 3, device=x.device)
        rope = self.pos_embed(torch.cat([txt_ids.reshape(-1, 3), img_ids.reshape(-1, 3)], dim=0))

        for block in self.transformer_blocks:
            text, x = self._run(block, x, text, temb, rope)
        joint = torch.cat([text, x], dim=1)
        for block in self.single_transformer_blocks:
            joint = self._run(block, joint, temb, rope)
        x = joint[:, text.shape[1] :]

        x = self.project_from_hidden(self.project_from_hidden_norm(x))
        x = x.reshape(b, h, w, d).permute(0, 3, 1, 2)
        if self.up_block is not None:
            x = self.up_block(x)
        return MeissonicTransformerOutput(logits=self.mlm_layer(x), features=x)
