"""Tiny random Meissonic parts for the tests: a 1 dual + 1 single block transformer,
a 2-level VQ model, a 2-layer CLIP text model and a real CLIP BPE tokenizer built
offline from the vocabulary shipped with open_clip."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch

TINY_TRANSFORMER = dict(
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=12,
    axes_dims_rope=(2, 2, 4),
    vocab_size=20,  # ids 16..19 are extra; mask = 19
    codebook_size=16,
    downsample=True,
    upsample=True,
)
#: Pixels per side: the 2-level VQ model downsamples by 2, so the token grid is 4x4.
TINY_RESOLUTION = 8


def write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of the CLIP BPE (49408 ids) from open_clip's merge list."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    # Locate the package without importing it (importing open_clip pulls in timm).
    bpe = Path(importlib.util.find_spec("open_clip").origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


def clip_tokenizer(folder: Path, max_length: int = 77):
    """The real CLIP BPE tokenizer (:func:`write_clip_tokenizer_files` in ``folder``)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)


def tiny_transformer(seed: int = 0):
    from mdmrl_plugins.meissonic.transformer import MeissonicTransformer2DModel

    torch.manual_seed(seed)
    model = MeissonicTransformer2DModel(**TINY_TRANSFORMER)
    # The default init leaves RMSNorm weights at 1 and AdaLN at small values; random
    # norms make every parameter matter in the equality tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm_" in name or "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def tiny_vqvae(seed: int = 0):
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        sample_size=TINY_RESOLUTION,
        num_vq_embeddings=TINY_TRANSFORMER["codebook_size"],
        norm_num_groups=4,
        vq_embed_dim=4,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
    ).eval()


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TINY_TRANSFORMER["joint_attention_dim"],
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TINY_TRANSFORMER["pooled_projection_dim"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config).eval()


def save_tiny_meissonic(folder: Path, tokenizer) -> Path:
    """A Meissonic folder (transformer/, vqvae/, text_encoder/, tokenizer/) of the tiny
    seed-0 parts and ``tokenizer``, as ``MeissonicBackbone`` loads one."""
    tiny_transformer().save_pretrained(folder / "transformer")
    tiny_vqvae().save_pretrained(folder / "vqvae")
    tiny_text_encoder().save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    return folder
