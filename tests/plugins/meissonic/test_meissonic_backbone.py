"""The ``meissonic`` backbone on tiny random parts: text encoding, forward conventions,
decoding, loading from folders, missing-weight errors, LoRA, registration."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meissonic_tiny import TINY_RESOLUTION, TINY_TRANSFORMER, save_tiny_meissonic

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext
from mdmrl.trajectory import Conditioning
from mdmrl_plugins.meissonic.backbone import (
    HUB_ID,
    SUBFOLDERS,
    MeissonicBackbone,
    MeissonicOptions,
    pipeline_timestep,
)

GRID = TINY_RESOLUTION // 2  # tiny VQ downsamples by 2
N = GRID * GRID
V = TINY_TRANSFORMER["codebook_size"]


def _tokens(batch: int, masked: int, seed: int = 0, mask_id: int = TINY_TRANSFORMER["vocab_size"] - 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (batch, N), generator=g)
    tokens[:, :masked] = mask_id
    return tokens


# ------------------------------------------------------------------ text


def test_encode_prompts_follows_the_pipeline(make_backbone, clip_tokenizer):
    bb = make_backbone()
    prompts = ["a red cube left of a blue sphere", "two cats", ""]
    cond = bb.encode_prompts(prompts)
    assert cond.hidden.shape == (3, 77, TINY_TRANSFORMER["joint_attention_dim"])
    assert cond.pooled.shape == (3, TINY_TRANSFORMER["pooled_projection_dim"])
    assert cond.attention_mask.dtype == torch.bool and cond.attention_mask.shape == (3, 77)
    # real BPE tokens: <start> + words + <end>, then padding
    assert cond.attention_mask.sum(1).tolist() == [10, 4, 2]

    ids = clip_tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ref = bb.text_encoder(ids, output_hidden_states=True)
    torch.testing.assert_close(cond.hidden, ref.hidden_states[-2])
    torch.testing.assert_close(cond.pooled, ref.text_embeds)
    assert not torch.allclose(cond.hidden[0], cond.hidden[1])

    # the null prompt is "", and fixed-length conditionings concatenate for CFG
    null = bb.null_conditioning(2)
    torch.testing.assert_close(null.hidden[0], cond.hidden[2])
    assert bb.null_conditioning(2) is null  # kept while the frozen text encoder is unchanged
    with torch.no_grad():  # a checkpoint load changes it in place
        for p in bb.text_encoder.parameters():
            p.mul_(1.5)
    assert not torch.equal(bb.null_conditioning(2).hidden, null.hidden)
    both = Conditioning.cat([cond, null])
    assert both.hidden.shape[0] == 5


def test_long_prompts_are_truncated_to_77_tokens(make_backbone):
    bb = make_backbone()
    cond = bb.encode_prompts(["cube " * 200])
    assert cond.hidden.shape[1] == 77 and bool(cond.attention_mask.all())


# ------------------------------------------------------------------ timestep


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 96), st.data())
def test_pipeline_timestep_inverts_the_cosine_schedule(steps, data):
    i = data.draw(st.integers(0, steps - 1))
    ratio = torch.tensor([math.cos(math.pi / 2 * i / steps)])
    assert pipeline_timestep(ratio, steps).item() == steps - 1 - i


def test_pipeline_timestep_on_the_published_grid_with_floor_rounding():
    # The pipeline masks floor(4096 * cos(...)) of the 64x64 tokens; every step of its
    # default 48-step run maps back to its own scheduler timestep.
    steps, n = 48, 4096
    for i in range(steps):
        kept_masked = n if i == 0 else math.floor(n * math.cos(math.pi / 2 * i / steps))
        r = torch.tensor([kept_masked / n])
        assert pipeline_timestep(r, steps).item() == steps - 1 - i


@settings(max_examples=25, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.integers(1, 96))
def test_pipeline_timestep_is_monotone_and_in_range(a, b, steps):
    lo, hi = sorted([a, b])
    t = pipeline_timestep(torch.tensor([lo, hi]), steps)
    assert t.dtype == torch.float32
    assert 0 <= t[0].item() <= t[1].item() <= steps - 1
    assert pipeline_timestep(torch.tensor([1.0]), steps).item() == steps - 1
    assert pipeline_timestep(torch.tensor([0.0]), steps).item() == 0


def test_forward_passes_the_mapped_timestep_and_micro_conditions(make_backbone, monkeypatch):
    bb = make_backbone(pipeline_steps=48, aesthetic_score=5.5)
    seen = {}
    original = bb.transformer.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(bb.transformer, "forward", spy)
    frac = torch.tensor([1.0, 0.0, math.cos(math.pi / 2 * 10 / 48)])
    bb(_tokens(3, 5), bb.encode_prompts(["a", "b", "c"]), frac)
    assert seen["timestep"].tolist() == [47.0, 0.0, 37.0]
    expected = [[TINY_RESOLUTION, TINY_RESOLUTION, 0.0, 0.0, 5.5]] * 3
    assert seen["micro_conds"].tolist() == expected


def test_logits_depend_on_timestep_only_through_the_pipeline_step(make_backbone):
    bb = make_backbone()
    cond = bb.encode_prompts(["a cat"] * 2)
    tokens = _tokens(2, 6)
    with torch.no_grad():
        a = bb(tokens, cond, torch.tensor([0.50, 0.50])).logits
        same_step = bb(tokens, cond, torch.tensor([0.501, 0.499])).logits  # both round to one step
        other = bb(tokens, cond, torch.tensor([0.9, 0.1])).logits
    steps = pipeline_timestep(torch.tensor([0.501, 0.499, 0.5, 0.9, 0.1]), 48).tolist()
    assert steps[0] == steps[1] == steps[2] and steps[3] != steps[2] != steps[4]
    torch.testing.assert_close(a, same_step)
    assert not torch.allclose(a, other)


# ------------------------------------------------------------------ forward / decode


# make_backbone is a stateless factory, so sharing it across examples is safe.
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 3), st.integers(0, N), st.sampled_from(["float32", "bfloat16"]))
def test_forward_shapes_and_dtypes(make_backbone, batch, masked, dtype):
    bb = make_backbone(dtype=dtype)
    assert bb.grid_shape == (GRID, GRID) and bb.num_tokens == N
    assert bb.codebook_size == V and bb.mask_token_id == TINY_TRANSFORMER["vocab_size"] - 1
    cond = bb.encode_prompts(["a dog"] * batch)
    assert cond.hidden.dtype == torch.__dict__[dtype]
    with torch.no_grad():
        out = bb(_tokens(batch, masked), cond, torch.full((batch,), masked / N))
    assert out.logits.shape == (batch, N, V) and out.logits.dtype == torch.float32
    assert out.features.shape == (batch, N, bb.feature_dim)
    assert out.features.dtype == torch.__dict__[dtype]
    assert bool(torch.isfinite(out.logits).all())


def test_logits_are_the_transformer_head_in_row_major_order(make_backbone):
    bb = make_backbone()
    cond = bb.encode_prompts(["x", "y"])
    tokens = _tokens(2, 4)
    with torch.no_grad():
        out = bb(tokens, cond, torch.tensor([0.25, 0.25]))
        raw = bb.transformer(
            tokens.view(2, GRID, GRID),
            encoder_hidden_states=cond.hidden,
            pooled_projections=cond.pooled,
            timestep=pipeline_timestep(torch.tensor([0.25, 0.25]), 48),
            micro_conds=bb.micro_conds.expand(2, -1),
        )
    # position (row 1, col 2) of the grid is token 1 * GRID + 2
    torch.testing.assert_close(out.logits[:, GRID + 2], raw.logits[:, :, 1, 2])
    torch.testing.assert_close(out.features[:, GRID + 2], raw.features[:, :, 1, 2])


def test_decode_gives_images_in_unit_range(make_backbone):
    bb = make_backbone()
    tokens = _tokens(5, 0)  # 5 > DECODE_CHUNK exercises chunking
    images = bb.decode(tokens)
    assert images.shape == (5, 3, TINY_RESOLUTION, TINY_RESOLUTION) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        ref = bb.vqvae.decode(tokens, force_not_quantize=True, shape=(5, GRID, GRID, 4)).sample.clamp(0, 1)
    torch.testing.assert_close(images, ref)
    assert not torch.allclose(images[0], images[1])


def test_bad_resolution_is_a_user_error(make_backbone):
    with pytest.raises(UserError, match="resolution"):
        make_backbone(resolution=10)


# ------------------------------------------------------------------ training levers


def test_lora_adds_trainable_adapters_only(make_backbone):
    plain = make_backbone()
    bb = make_backbone(lora_rank=2)
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".add_q_proj.lora_A" in n for n in trainable) and any(".to_q.lora_B" in n for n in trainable)
    assert not any(p.requires_grad for p in bb.text_encoder.parameters())
    assert not any(p.requires_grad for p in bb.vqvae.parameters())
    n_lora = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    assert 0 < n_lora < sum(p.numel() for p in bb.transformer.parameters()) / 5

    cond = plain.encode_prompts(["a"])
    tokens, t = _tokens(1, 5), torch.tensor([0.3])
    with torch.no_grad():  # fresh adapters are zero: same function as the base model
        torch.testing.assert_close(bb(tokens, cond, t).logits, plain(tokens, cond, t).logits)
    bb.train()
    bb(tokens, cond, t).logits.logsumexp(-1).mean().backward()
    grads = {n for n, p in bb.named_parameters() if p.grad is not None}
    assert grads and grads <= set(trainable)


def test_full_fine_tune_trains_the_transformer_only(make_backbone):
    bb = make_backbone()
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable == {"transformer." + n for n, _ in bb.transformer.named_parameters()}


def test_gradient_checkpointing_option_gives_same_gradients(make_backbone):
    def grads(checkpointing):
        bb = make_backbone(gradient_checkpointing=checkpointing).train()
        assert bb.transformer.gradient_checkpointing is checkpointing
        cond = bb.encode_prompts(["a", "b"])
        bb(_tokens(2, 7), cond, torch.tensor([0.4, 0.9])).logits.logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in bb.named_parameters() if p.grad is not None}

    a, b = grads(False), grads(True)
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=n)


def test_train_mode_keeps_frozen_parts_in_eval(make_backbone):
    bb = make_backbone().train()
    assert bb.transformer.training and not bb.text_encoder.training and not bb.vqvae.training


# ------------------------------------------------------------------ loading


def test_from_options_loads_a_local_folder_with_from_pretrained(tmp_path, clip_tokenizer, make_backbone):
    save_tiny_meissonic(tmp_path / "weights" / "meissonic", clip_tokenizer)
    options = MeissonicOptions(path="weights/meissonic", resolution=TINY_RESOLUTION)
    loaded = MeissonicBackbone.from_options(options, BuildContext(recipe_dir=str(tmp_path)))
    built = make_backbone()
    cond = built.encode_prompts(["a red cube", ""])
    torch.testing.assert_close(loaded.encode_prompts(["a red cube", ""]).hidden, cond.hidden)
    tokens, t = _tokens(2, 3), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, cond, t).logits, built(tokens, cond, t).logits)
    finished = _tokens(2, 0)
    assert torch.equal(loaded.decode(finished), built.decode(finished))


def _assert_one_line_download_hint(err: UserError):
    msg = str(err)
    assert "\n" not in msg
    assert HUB_ID in msg and all(f"{s}/" in msg for s in SUBFOLDERS) and "backbone.options.path" in msg


def test_missing_local_folder_is_one_user_error_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        MeissonicBackbone.from_options(
            MeissonicOptions(path=str(tmp_path / "nowhere" / "meissonic")), BuildContext()
        )
    assert time.monotonic() - start < 5
    _assert_one_line_download_hint(err.value)
    assert "does not exist" in str(err.value) and "nowhere" in str(err.value)


def test_folder_lacking_subfolders_names_them(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(UserError) as err:
        MeissonicBackbone.from_options(MeissonicOptions(path=str(tmp_path)), BuildContext())
    _assert_one_line_download_hint(err.value)
    assert "lacks text_encoder/, vqvae/" in str(err.value)


def test_hub_id_absent_from_cache_offline_is_one_user_error_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder named like the hub id
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        MeissonicBackbone.from_options(
            MeissonicOptions(path="MeissonFlow/Meissonic-not-downloaded"),
            BuildContext(recipe_dir=str(tmp_path)),
        )
    assert time.monotonic() - start < 10
    _assert_one_line_download_hint(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value)


def test_inconsistent_parts_are_a_user_error(clip_tokenizer):
    from meissonic_tiny import tiny_text_encoder, tiny_transformer

    from mdmrl_plugins.meissonic.transformer import MeissonicTransformer2DModel

    wrong = MeissonicTransformer2DModel(**dict(TINY_TRANSFORMER, joint_attention_dim=24))
    with pytest.raises(UserError, match="joint_attention_dim"):
        MeissonicBackbone.from_modules(wrong, _vq(), tiny_text_encoder(), clip_tokenizer)
    with pytest.raises(UserError, match="num_vq_embeddings"):
        MeissonicBackbone.from_modules(
            tiny_transformer(), _vq(codebook=32), tiny_text_encoder(), clip_tokenizer
        )


def _vq(codebook: int = V):
    from diffusers import VQModel

    return VQModel(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                   num_vq_embeddings=codebook, vq_embed_dim=4, lookup_from_codebook=True)  # fmt: skip


# ------------------------------------------------------------------ registration


def test_registered_as_meissonic_and_options_validate():
    from mdmrl import options as opts
    from mdmrl.plugins import Registry
    from mdmrl_plugins.meissonic import plugin

    reg = Registry()
    reg.register_plugin(plugin, "meissonic")
    assert reg.get("backbone", "meissonic").cls is MeissonicBackbone

    problems: list[str] = []
    built = opts.build(
        MeissonicOptions, {"path": "w", "dtype": "bfloat16", "lora_rank": 4}, "backbone.options", problems
    )
    assert problems == [] and built.dtype == "bfloat16" and built.lora_rank == 4
    opts.build(
        MeissonicOptions, {"dtype": "float64", "lora_rank": -1, "typo": 1}, "backbone.options", problems
    )
    assert len(problems) == 3


def test_plugin_module_imports_no_heavy_library():
    code = (
        "import sys, mdmrl_plugins.meissonic.plugin; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'open_clip', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ end to end


def test_confidence_sampler_with_meissonic_schedule_gives_pil_images(make_backbone):
    from PIL import Image

    from mdmrl_plugins.cogrpo.sampler import ConfidenceSampler
    from mdmrl_plugins.cogrpo.schedules import MeissonicSchedule

    bb = make_backbone()
    sampler, schedule = ConfidenceSampler(), MeissonicSchedule()
    prompts = ["a red cube", "two blue spheres", "a red cube"]
    seeds = torch.tensor([0, 1, 2])
    traj = sampler.sample(bb, schedule, prompts, num_steps=4, seeds=seeds)
    traj.validate(bb.mask_token_id)
    assert traj.tokens.shape == (3, 5, N)
    final = traj.final_tokens
    assert bool(((final >= 0) & (final < V)).all())
    # per-sample seeds: the same seed reproduces a trajectory, alone or in a batch
    again = sampler.sample(bb, schedule, prompts[:1], num_steps=4, seeds=seeds[:1])
    assert torch.equal(again.final_tokens[0], final[0])

    images = bb.decode(final)
    pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for img in images]
    assert [p.size for p in pil] == [(TINY_RESOLUTION, TINY_RESOLUTION)] * 3 and pil[0].mode == "RGB"


def test_text_encoder_path_replaces_the_text_encoder_subfolder(tmp_path, clip_tokenizer, make_backbone):
    import shutil

    save_tiny_meissonic(tmp_path / "meissonic", clip_tokenizer)
    shutil.move(tmp_path / "meissonic" / "text_encoder", tmp_path / "clip")
    options = MeissonicOptions(path="meissonic", text_encoder_path="clip", resolution=TINY_RESOLUTION)
    loaded = MeissonicBackbone.from_options(options, BuildContext(recipe_dir=str(tmp_path)))
    ref = make_backbone().encode_prompts(["a red cube"])
    torch.testing.assert_close(loaded.encode_prompts(["a red cube"]).hidden, ref.hidden)
    # without the override the missing subfolder is reported
    with pytest.raises(UserError, match="lacks text_encoder/"):
        MeissonicBackbone.from_options(
            MeissonicOptions(path="meissonic", resolution=TINY_RESOLUTION),
            BuildContext(recipe_dir=str(tmp_path)),
        )
