"""The Meissonic transformer: checkpoint structure, block numerics against diffusers'
Flux building blocks, save/load round trips, gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from meissonic_tiny import TINY_TRANSFORMER, tiny_transformer

from mdmrl_plugins.meissonic import structure
from mdmrl_plugins.meissonic.transformer import (
    DownBlock,
    DualStreamBlock,
    MeissonicTransformer2DModel,
    RotaryEmbedding,
    SingleStreamBlock,
    TimeTextEmbedding,
    UpBlock,
    image_position_ids,
    sinusoidal_embedding,
)


def _inputs(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    h = w = 4
    ids = torch.randint(0, cfg.codebook_size, (batch, h, w), generator=g)
    ids[:, 0] = cfg.vocab_size - 1  # a masked row
    return dict(
        hidden_states=ids,
        encoder_hidden_states=torch.randn(batch, 7, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([3.0, 0.0])[:batch],
        micro_conds=torch.tensor([[8.0, 8.0, 0.0, 0.0, 6.0]]).expand(batch, -1),
    )


def test_full_size_model_matches_published_checkpoint_table():
    with torch.device("meta"):
        model = MeissonicTransformer2DModel(**structure.PUBLISHED_CONFIG)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    table = structure.published_structure()
    assert sorted(set(ours) - set(table)) == []
    assert sorted(set(table) - set(ours)) == []
    assert {k: v for k, v in ours.items() if table[k] != v} == {}
    n = sum(p.numel() for p in model.parameters())
    assert n == structure.parameter_count(table) == 1_006_946_304
    assert 0.95e9 < n < 1.05e9
    # the published config.json's keys are exactly our config keys
    registered = {k for k in model.config if not k.startswith("_")}
    assert registered == set(structure.PUBLISHED_CONFIG)


def test_rope_matches_diffusers_flux_pos_embed():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.cat([torch.zeros(5, 3), image_position_ids(6, 4)])
    ours = RotaryEmbedding((16, 56, 56))(ids)
    ref = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.float())
    # text ids are zero: rotation is the identity there
    assert torch.equal(ours[0][:5], torch.ones(5, 128)) and torch.equal(ours[1][:5], torch.zeros(5, 128))


def test_image_position_ids_are_row_major_rows_then_columns():
    ids = image_position_ids(2, 3)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def _rope(length, head_dim=8, axes=(2, 2, 4)):
    ids = torch.cat([torch.zeros(3, 3), image_position_ids(2, (length - 3) // 2)])
    return RotaryEmbedding(axes)(ids)


def test_dual_stream_block_matches_diffusers_flux_block():
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    torch.manual_seed(0)
    ours = DualStreamBlock(16, 2, 8).eval()
    ref = FluxTransformerBlock(16, 2, 8).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict(), strict=True)
    image, text, temb = torch.randn(2, 6, 16), torch.randn(2, 3, 16), torch.randn(2, 16)
    rope = _rope(9)
    with torch.no_grad():
        text_a, image_a = ours(image, text, temb, rope)
        text_b, image_b = ref(image, text, temb, rope)
    torch.testing.assert_close(image_a, image_b)
    torch.testing.assert_close(text_a, text_b)


def test_single_stream_block_matches_diffusers_flux_single_block():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    torch.manual_seed(0)
    ours = SingleStreamBlock(16, 2, 8).eval()
    ref = FluxSingleTransformerBlock(16, 2, 8).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict(), strict=True)
    image, text, temb = torch.randn(2, 6, 16), torch.randn(2, 3, 16), torch.randn(2, 16)
    rope = _rope(9)
    with torch.no_grad():
        joint = ours(torch.cat([text, image], 1), temb, rope)
        text_b, image_b = ref(image, text, temb, rope)
    torch.testing.assert_close(joint, torch.cat([text_b, image_b], 1))


def test_resampling_and_embeddings_match_diffusers_modules():
    from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, get_timestep_embedding
    from diffusers.models.resnet import Downsample2D, Upsample2D

    torch.manual_seed(0)
    down, up = DownBlock(8), UpBlock(8)
    for m in (down, up):
        with torch.no_grad():
            for p in m.parameters():
                p.uniform_(-1, 1)
    ref_down = Downsample2D(8, use_conv=True, padding=0, name="Conv2d_0", kernel_size=2, norm_type="rms_norm",
                            eps=1e-6, elementwise_affine=True, bias=False)  # fmt: skip
    ref_up = Upsample2D(8, use_conv_transpose=True, kernel_size=2, padding=0, name="conv", norm_type="rms_norm",
                        eps=1e-6, elementwise_affine=True, bias=False, interpolate=False)  # fmt: skip
    ref_down.load_state_dict(down.downsample.state_dict(), strict=True)
    ref_up.load_state_dict(up.upsample.state_dict(), strict=True)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(down(x), ref_down(x))
        torch.testing.assert_close(up(x), ref_up(x))
        assert down(x).shape == (2, 8, 2, 2) and up(x).shape == (2, 8, 8, 8)

    values = torch.tensor([1024.0, 0.0, 6.0, 3000.0])
    torch.testing.assert_close(
        sinusoidal_embedding(values, 256),
        get_timestep_embedding(values, 256, flip_sin_to_cos=True, downscale_freq_shift=0),
    )

    ours = TimeTextEmbedding(16)
    ref = CombinedTimestepTextProjEmbeddings(embedding_dim=16, pooled_projection_dim=16)
    ref.load_state_dict(ours.state_dict(), strict=True)
    t, cond = torch.tensor([47000.0, 0.0]), torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(t, cond), ref(t, cond))


def test_forward_shapes_and_mask_conventions():
    model = tiny_transformer()
    with torch.no_grad():
        out = model(**_inputs(model))
    d = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
    assert out.logits.shape == (2, TINY_TRANSFORMER["codebook_size"], 4, 4)
    assert out.features.shape == (2, d, 4, 4)
    assert model.mask_token_id == TINY_TRANSFORMER["vocab_size"] - 1
    # the logits are the MLM head applied to the features
    with torch.no_grad():
        torch.testing.assert_close(model.mlm_layer(out.features), out.logits)


def test_forward_reads_every_condition():
    model = tiny_transformer()
    base = _inputs(model)
    with torch.no_grad():
        ref = model(**base).logits
        for key, change in [
            ("timestep", lambda t: t + 1),
            ("micro_conds", lambda m: m + torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])),
            ("pooled_projections", lambda p: p + 1),
            ("encoder_hidden_states", lambda e: e + 1),
        ]:
            changed = dict(base, **{key: change(base[key])})
            assert not torch.allclose(model(**changed).logits, ref), key


def test_save_pretrained_round_trip_and_published_folder_layout(tmp_path):
    model = tiny_transformer()
    inputs = _inputs(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    model.save_pretrained(tmp_path / "ours")
    loaded = MeissonicTransformer2DModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, ref)

    # A folder laid out like the published transformer/: the original class name and
    # diffusers version in config.json, weights in diffusion_pytorch_model.safetensors.
    from safetensors.torch import save_file

    folder = tmp_path / "published" / "transformer"
    folder.mkdir(parents=True)
    config = {
        "_class_name": "Transformer2DModel",
        "_diffusers_version": "0.30.2",
        "patch_size": 1,
        "in_channels": 64,
    }
    config.update({k: list(v) if isinstance(v, tuple) else v for k, v in TINY_TRANSFORMER.items()})
    config["guidance_embeds"] = False
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        folder / "diffusion_pytorch_model.safetensors",
    )
    published = MeissonicTransformer2DModel.from_pretrained(
        tmp_path / "published", subfolder="transformer"
    ).eval()
    with torch.no_grad():
        assert torch.equal(published(**inputs).logits, ref)


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    def loss_and_grads(checkpointing: bool):
        model = tiny_transformer().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        out = model(**_inputs(model))
        loss = out.logits.logsumexp(1).mean() + out.features.pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_gradient_checkpointing_recomputes_blocks(monkeypatch):
    model = tiny_transformer().train()
    model.enable_gradient_checkpointing()
    calls = []
    original = model._gradient_checkpointing_func
    monkeypatch.setattr(model, "_gradient_checkpointing_func", lambda *a: calls.append(a[0]) or original(*a))
    model(**_inputs(model)).logits.sum().backward()
    assert len(calls) == TINY_TRANSFORMER["num_layers"] + TINY_TRANSFORMER["num_single_layers"]


@pytest.mark.parametrize(
    "bad",
    [
        {"guidance_embeds": True},
        {"downsample": True, "upsample": False},
        {"axes_dims_rope": (2, 2, 2)},
        {"vocab_size": 16},
    ],
)
def test_unsupported_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        MeissonicTransformer2DModel(**dict(TINY_TRANSFORMER, **bad))
