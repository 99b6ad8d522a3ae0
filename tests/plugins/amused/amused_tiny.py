"""Tiny random aMUSEd parts for the tests: a UVit2DModel, a 1-level VQ model and a
2-layer CLIP text model that fit together, with the real CLIP BPE tokenizer of the
Meissonic tests (built offline from the vocabulary open_clip ships)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "meissonic"))
from meissonic_tiny import clip_tokenizer  # noqa: E402

from mdmrl_plugins.amused.backbone import TEXT_LENGTH  # noqa: E402

CODEBOOK, VOCAB, SIDE = 16, 18, 8  # mask id = VOCAB - 1 = 17; 8 x 8 = 64 tokens

__all__ = ["CODEBOOK", "SIDE", "VOCAB", "clip_tokenizer", "save_tiny_amused", "tiny_modules"]


def tiny_modules(seed: int = 0):
    """A tiny random UVit2DModel, VQModel and CLIP text encoder that fit together."""
    from diffusers import UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = UVit2DModel(
        hidden_size=16,
        cond_embed_dim=8,
        micro_cond_encode_dim=2,
        micro_cond_embed_dim=10,
        encoder_hidden_size=8,
        vocab_size=VOCAB,
        codebook_size=CODEBOOK,
        in_channels=8,
        block_out_channels=8,
        num_res_blocks=1,
        downsample=True,
        upsample=True,
        block_num_heads=1,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=16,
        layer_norm_eps=1e-12,
        sample_size=SIDE,
    )
    vqvae = VQModel(
        act_fn="silu",
        block_out_channels=[8],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        layers_per_block=1,
        norm_num_groups=8,
        num_vq_embeddings=CODEBOOK,
        sample_size=SIDE,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
    )
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=1,
            num_hidden_layers=2,
            projection_dim=8,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    return transformer.eval(), vqvae.eval(), text_encoder.eval()


def save_tiny_amused(folder: Path, modules) -> Path:
    """An aMUSEd folder (transformer/, vqvae/, text_encoder/, tokenizer/) of ``modules``
    = (transformer, vqvae, text_encoder, tokenizer), as ``AmusedBackbone`` loads one."""
    transformer, vqvae, text_encoder, tokenizer = modules
    for name, part in [("transformer", transformer), ("vqvae", vqvae), ("text_encoder", text_encoder)]:
        part.save_pretrained(folder / name)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    return folder
