"""The published Meissonic checkpoint's parameter table: name -> shape.

This is the content of ``MeissonFlow/Meissonic``'s ``transformer/`` weights for the
published ``transformer/config.json``::

    attention_head_dim 128, num_attention_heads 8 (D = 1024), num_layers 14,
    num_single_layers 28, joint_attention_dim 1024, pooled_projection_dim 1024,
    axes_dims_rope [16, 56, 56], vocab_size 8256, codebook_size 8192,
    downsample true, upsample true (patch_size 1, in_channels 64, guidance_embeds false)

It was derived by reading the published model code (viiika/Meissonic,
``src/transformer.py``: which diffusers building blocks each module is, with which
arguments) together with that config, and writing down the parameters those building
blocks own; it was cross-checked by composing diffusers' own building blocks the same
way on the ``meta`` device (867 tensors, 1,006,946,304 parameters). See
docs/meissonic.md. The table is independent of :mod:`.transformer`; the tests compare
the two key for key.
"""

from __future__ import annotations

#: Published config (transformer/config.json), minus the bookkeeping keys.
PUBLISHED_CONFIG: dict = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "codebook_size": 8192,
    "downsample": True,
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 1024,
    "num_attention_heads": 8,
    "num_layers": 14,
    "num_single_layers": 28,
    "patch_size": 1,
    "pooled_projection_dim": 1024,
    "upsample": True,
    "vocab_size": 8256,
}

D = 1024  # num_attention_heads * attention_head_dim
HEAD = 128  # attention_head_dim
MLP = 4 * D  # feed-forward width
TEXT = 1024  # joint_attention_dim (CLIP-ViT-H-14 hidden size)
POOLED = 1024  # pooled_projection_dim (CLIP-ViT-H-14 projection size)
MICRO = 5 * 256  # five micro-conditions, 256 sinusoid channels each
VOCAB = 8256
CODEBOOK = 8192
NUM_DUAL = 14
NUM_SINGLE = 28

#: Parameters outside the block stacks.
TOP_LEVEL: dict[str, tuple[int, ...]] = {
    # CombinedTimestepTextProjEmbeddings(embedding_dim=D, pooled_projection_dim=POOLED)
    "time_text_embed.timestep_embedder.linear_1.weight": (D, 256),
    "time_text_embed.timestep_embedder.linear_1.bias": (D,),
    "time_text_embed.timestep_embedder.linear_2.weight": (D, D),
    "time_text_embed.timestep_embedder.linear_2.bias": (D,),
    "time_text_embed.text_embedder.linear_1.weight": (D, POOLED),
    "time_text_embed.text_embedder.linear_1.bias": (D,),
    "time_text_embed.text_embedder.linear_2.weight": (D, D),
    "time_text_embed.text_embedder.linear_2.bias": (D,),
    # nn.Linear(joint_attention_dim, D)
    "context_embedder.weight": (D, TEXT),
    "context_embedder.bias": (D,),
    # UVit2DConvEmbed(D, D, vocab_size, affine RMSNorm, eps 1e-6, bias False)
    "embed.embeddings.weight": (VOCAB, D),
    "embed.layer_norm.weight": (D,),
    "embed.conv.weight": (D, D, 1, 1),
    # ConvMlmLayer(D, D, bias False, affine RMSNorm, eps 1e-6, codebook_size)
    "mlm_layer.conv1.weight": (D, D, 1, 1),
    "mlm_layer.layer_norm.weight": (D,),
    "mlm_layer.conv2.weight": (CODEBOOK, D, 1, 1),
    # TimestepEmbedding(1280 + pooled_projection_dim, D, sample_proj_bias=False)
    "cond_embed.linear_1.weight": (D, MICRO + POOLED),
    "cond_embed.linear_2.weight": (D, D),
    # RMSNorm(D) / nn.Linear(D, D, bias=False)
    "encoder_proj_layer_norm.weight": (D,),
    "project_to_hidden_norm.weight": (D,),
    "project_to_hidden.weight": (D, D),
    "project_from_hidden_norm.weight": (D,),
    "project_from_hidden.weight": (D, D),
    # Downsample2D(D, use_conv, kernel 2, rms_norm, bias False, name "Conv2d_0" -> .conv)
    "down_block.downsample.norm.weight": (D,),
    "down_block.downsample.conv.weight": (D, D, 2, 2),
    # Upsample2D(D, use_conv_transpose, kernel 2, rms_norm, bias False, name "conv")
    "up_block.upsample.norm.weight": (D,),
    "up_block.upsample.conv.weight": (D, D, 2, 2),
}

#: Parameters of one dual-stream block ``transformer_blocks.{i}``.
DUAL_BLOCK: dict[str, tuple[int, ...]] = {
    # AdaLayerNormZero(D): Linear(D, 6 D); LayerNorm without affine
    "norm1.linear.weight": (6 * D, D),
    "norm1.linear.bias": (6 * D,),
    "norm1_context.linear.weight": (6 * D, D),
    "norm1_context.linear.bias": (6 * D,),
    # Attention(query_dim=D, added_kv_proj_dim=D, dim_head=128, heads=8, out_dim=D,
    #           context_pre_only=False, bias=True, qk_norm="rms_norm")
    "attn.norm_q.weight": (HEAD,),
    "attn.norm_k.weight": (HEAD,),
    "attn.to_q.weight": (D, D),
    "attn.to_q.bias": (D,),
    "attn.to_k.weight": (D, D),
    "attn.to_k.bias": (D,),
    "attn.to_v.weight": (D, D),
    "attn.to_v.bias": (D,),
    "attn.add_q_proj.weight": (D, D),
    "attn.add_q_proj.bias": (D,),
    "attn.add_k_proj.weight": (D, D),
    "attn.add_k_proj.bias": (D,),
    "attn.add_v_proj.weight": (D, D),
    "attn.add_v_proj.bias": (D,),
    "attn.norm_added_q.weight": (HEAD,),
    "attn.norm_added_k.weight": (HEAD,),
    "attn.to_out.0.weight": (D, D),
    "attn.to_out.0.bias": (D,),
    "attn.to_add_out.weight": (D, D),
    "attn.to_add_out.bias": (D,),
    # FeedForward(D, dim_out=D, activation_fn="gelu-approximate"), twice
    "ff.net.0.proj.weight": (MLP, D),
    "ff.net.0.proj.bias": (MLP,),
    "ff.net.2.weight": (D, MLP),
    "ff.net.2.bias": (D,),
    "ff_context.net.0.proj.weight": (MLP, D),
    "ff_context.net.0.proj.bias": (MLP,),
    "ff_context.net.2.weight": (D, MLP),
    "ff_context.net.2.bias": (D,),
}

#: Parameters of one single-stream block ``single_transformer_blocks.{i}``.
SINGLE_BLOCK: dict[str, tuple[int, ...]] = {
    # AdaLayerNormZeroSingle(D): Linear(D, 3 D)
    "norm.linear.weight": (3 * D, D),
    "norm.linear.bias": (3 * D,),
    "proj_mlp.weight": (MLP, D),
    "proj_mlp.bias": (MLP,),
    "proj_out.weight": (D, D + MLP),
    "proj_out.bias": (D,),
    # Attention(query_dim=D, dim_head=128, heads=8, out_dim=D, bias=True,
    #           qk_norm="rms_norm", pre_only=True): no output projection
    "attn.norm_q.weight": (HEAD,),
    "attn.norm_k.weight": (HEAD,),
    "attn.to_q.weight": (D, D),
    "attn.to_q.bias": (D,),
    "attn.to_k.weight": (D, D),
    "attn.to_k.bias": (D,),
    "attn.to_v.weight": (D, D),
    "attn.to_v.bias": (D,),
}


def published_structure() -> dict[str, tuple[int, ...]]:
    """Every parameter of the published transformer checkpoint: name -> shape."""
    table = dict(TOP_LEVEL)
    for i in range(NUM_DUAL):
        table.update({f"transformer_blocks.{i}.{k}": v for k, v in DUAL_BLOCK.items()})
    for i in range(NUM_SINGLE):
        table.update({f"single_transformer_blocks.{i}.{k}": v for k, v in SINGLE_BLOCK.items()})
    return table


def parameter_count(table: dict[str, tuple[int, ...]]) -> int:
    """Number of scalar parameters in a name -> shape table."""
    total = 0
    for shape in table.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
