"""The aMUSEd backbone on tiny random modules, and token-exact parity of the confidence
sampler (``amused`` schedule, shared randomness) with diffusers' AmusedPipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from amused_tiny import CODEBOOK, SIDE, VOCAB, clip_tokenizer, save_tiny_amused, tiny_modules

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext
from mdmrl.plugins import get_registry
from mdmrl.trajectory import Conditioning
from mdmrl_plugins.amused.backbone import TEXT_LENGTH, AmusedBackbone, AmusedOptions
from mdmrl_plugins.cogrpo.sampler import ConfidenceOptions, ConfidenceSampler
from mdmrl_plugins.cogrpo.schedules import AmusedSchedule, AmusedScheduleOptions

PROMPTS = ["a red cat on a mat", "two dogs"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The real CLIP BPE tokenizer, built offline from the vocabulary open_clip ships."""
    return clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"), TEXT_LENGTH)


@pytest.fixture(scope="module")
def modules(tokenizer):
    transformer, vqvae, text_encoder = tiny_modules()
    return transformer, vqvae, text_encoder, tokenizer


@pytest.fixture(scope="module")
def backbone(modules):
    return AmusedBackbone.from_modules(*modules)


# --------------------------------------------------------------------------- the backbone


def test_shapes_and_attributes(backbone):
    assert backbone.grid_shape == (SIDE, SIDE) and backbone.num_tokens == SIDE * SIDE
    assert backbone.codebook_size == CODEBOOK and backbone.mask_token_id == VOCAB - 1
    assert backbone.feature_dim == 8
    assert get_registry().get("backbone", "amused").cls is AmusedBackbone


def test_conditioning_is_the_pipelines(backbone, modules):
    _, _, text_encoder, tokenizer = modules
    cond = backbone.encode_prompts(PROMPTS)
    assert cond.hidden.shape == (2, TEXT_LENGTH, 8) and cond.pooled.shape == (2, 8)
    ids = tokenizer(
        PROMPTS, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
    )
    out = text_encoder(ids.input_ids, output_hidden_states=True)
    assert torch.equal(cond.hidden, out.hidden_states[-2]) and torch.equal(cond.pooled, out.text_embeds)
    assert cond.attention_mask[0].sum() == len(tokenizer(PROMPTS[0]).input_ids)
    null = backbone.null_conditioning(3)  # fixed length L: the sampler concatenates cond and uncond
    assert Conditioning.cat([null, cond]).hidden.shape == (5, TEXT_LENGTH, 8)


def test_forward_logits_and_head_input_features(backbone):
    torch.manual_seed(1)
    tokens = torch.randint(0, CODEBOOK, (2, SIDE * SIDE))
    tokens[:, ::3] = backbone.mask_token_id
    cond = backbone.encode_prompts(PROMPTS)
    with torch.no_grad():
        out = backbone(tokens, cond, torch.full((2,), 1 / 3))
        again = backbone(tokens, cond, torch.tensor([0.9, 0.0]))  # UVit2DModel takes no timestep
    assert out.logits.shape == (2, SIDE * SIDE, CODEBOOK) and out.logits.dtype == torch.float32
    assert out.features.shape == (2, SIDE * SIDE, 8)
    assert torch.equal(out.logits, again.logits)
    assert backbone.transformer.mlm_layer.mdmrl_head_input is None  # the hook keeps no reference
    # the features are the MLM head's input: the head maps them to the logits
    grid = out.features.transpose(1, 2).reshape(2, 8, SIDE, SIDE)
    with torch.no_grad():
        head = backbone.transformer.mlm_layer(grid)
    assert torch.allclose(head.flatten(2).transpose(1, 2), out.logits, atol=1e-6)


def test_gradients_reach_the_transformer_only(modules):
    backbone = AmusedBackbone.from_modules(*tiny_modules(seed=2), modules[3])
    tokens = torch.full((1, SIDE * SIDE), backbone.mask_token_id)
    out = backbone(tokens, backbone.encode_prompts(["x"]), torch.ones(1))
    out.logits.logsumexp(-1).sum().backward()
    assert any(p.grad is not None for p in backbone.transformer.parameters())
    assert all(not p.requires_grad for p in backbone.text_encoder.parameters())
    assert all(not p.requires_grad for p in backbone.vqvae.parameters())


def test_decode(backbone):
    images = backbone.decode(torch.randint(0, CODEBOOK, (3, SIDE * SIDE)))
    assert images.shape == (3, 3, SIDE, SIDE) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_bad_resolution_is_a_user_error(modules):
    with pytest.raises(UserError, match="resolution"):
        AmusedBackbone.from_modules(*modules, options=AmusedOptions(resolution=7))


def test_mismatched_parts_are_a_user_error(modules):
    transformer, vqvae, text_encoder, tokenizer = modules
    other_vq = tiny_modules()[1]
    other_vq.register_to_config(num_vq_embeddings=CODEBOOK + 1)
    with pytest.raises(UserError, match="num_vq_embeddings"):
        AmusedBackbone.from_modules(transformer, other_vq, text_encoder, tokenizer)


def test_missing_weights_is_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as err:
        AmusedBackbone.from_options(AmusedOptions(path=str(tmp_path / "nowhere")), BuildContext())
    msg = str(err.value)
    assert "\n" not in msg and "amused/amused-256" in msg and "backbone.options.path" in msg
    (tmp_path / "partial" / "transformer").mkdir(parents=True)
    with pytest.raises(UserError, match="lacks vqvae/, text_encoder/, tokenizer/"):
        AmusedBackbone.from_options(AmusedOptions(path="partial"), BuildContext(recipe_dir=str(tmp_path)))


def test_hub_id_absent_offline_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as err:
        AmusedBackbone.from_options(AmusedOptions(path="amused/amused-256"), BuildContext())
    assert "\n" not in str(err.value) and "download" in str(err.value)


def test_loads_a_saved_folder(modules, tmp_path):
    save_tiny_amused(tmp_path, modules)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"mask_token_id": VOCAB - 1}))
    loaded = AmusedBackbone.from_options(AmusedOptions(path=str(tmp_path)), BuildContext())
    tokens = torch.full((1, SIDE * SIDE), VOCAB - 1)
    cond = loaded.encode_prompts(["a red cat"])
    with torch.no_grad():
        want = AmusedBackbone.from_modules(*modules)(tokens, cond, torch.ones(1)).logits
        assert torch.equal(loaded(tokens, cond, torch.ones(1)).logits, want)


# --------------------------------------------------------------------------- parity with diffusers


def amused_pipeline(modules):
    from diffusers import AmusedPipeline, AmusedScheduler

    transformer, vqvae, text_encoder, tokenizer = modules
    pipe = AmusedPipeline(
        vqvae=vqvae,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        scheduler=AmusedScheduler(mask_token_id=VOCAB - 1),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, seed: int, steps: int, guidance: float):
    """Final tokens [B, N] and the state after every step [T, B, N]."""
    states = []
    final = pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        callback=lambda i, t, latents: states.append(latents.reshape(len(PROMPTS), -1).clone()),
    ).images
    return final.reshape(len(PROMPTS), -1), torch.stack(states)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("steps", [4, 12])
def test_confidence_sampler_is_amuseds_sampler(modules, backbone, seed, steps):
    guidance = 10.0
    final, states = run_pipeline(amused_pipeline(modules), seed, steps, guidance)
    sampler = ConfidenceSampler(ConfidenceOptions(rng="shared", rounding="floor"))
    schedule = AmusedSchedule(AmusedScheduleOptions(guidance_scale=guidance))
    traj = sampler.sample(backbone, schedule, PROMPTS, steps, torch.tensor([seed, seed]))
    assert torch.equal(traj.final_tokens, final)
    assert torch.equal(traj.tokens[:, 1:].transpose(0, 1), states)  # every intermediate state too
    masked = (states == VOCAB - 1).sum(-1)[:, 0]
    assert masked[0] > masked[-2] > 0  # a real multi-step run, not a one-shot decode


def test_parity_depends_on_the_configuration(modules, backbone):
    """The parity test can fail: with the paper's ceil rounding the mask counts differ
    from aMUSEd's floor, and per-sample noise gives other tokens."""
    _, states = run_pipeline(amused_pipeline(modules), 0, 6, 10.0)
    schedule = AmusedSchedule()
    ceil = ConfidenceSampler(ConfidenceOptions(rng="shared", rounding="ceil"))
    traj = ceil.sample(backbone, schedule, PROMPTS, 6, torch.tensor([0, 0]))
    assert not torch.equal((traj.tokens[:, 1:] == VOCAB - 1).sum(-1).T, (states == VOCAB - 1).sum(-1))
    per = ConfidenceSampler(ConfidenceOptions(rng="per_sample", rounding="floor"))
    assert not torch.equal(
        per.sample(backbone, schedule, PROMPTS, 6, torch.tensor([0, 0])).final_tokens, states[-1]
    )


def test_amused_schedule_is_the_schedulers(modules):
    from diffusers import AmusedScheduler

    sched = AmusedScheduler(mask_token_id=VOCAB - 1)
    for steps in (3, 12):
        sched.set_timesteps(steps, (2, 0))
        ours = AmusedSchedule()
        for i in range(steps - 1):  # the last step re-masks nothing
            a, _, _ = ours.act(i, steps, 1, None, None)
            ratio = torch.cos((torch.tensor([[i]]) + 1) / steps * math.pi / 2)
            assert float(a[0, 1]) == float(ratio) and float(a[0, 2]) == float(sched.temperatures[i])


def test_replay_is_exact_on_the_amused_backbone(backbone):
    sampler = ConfidenceSampler()
    traj = sampler.sample(backbone, AmusedSchedule(), PROMPTS, 3, torch.tensor([5, 6]))
    cond, uncond = backbone.encode_prompts(PROMPTS), backbone.null_conditioning(2)
    with torch.no_grad():
        for t in range(3):
            rep = sampler.replay_step(backbone, traj, t, cond, uncond)
            assert torch.equal(rep.model_log_prob, traj.model_log_probs[:, t])


def test_a_deep_copy_reads_its_own_features(backbone):
    """The engine deep-copies the backbone for the KL reference; the copy's feature
    hook must fill the copy's head, not the original's."""
    import copy

    clone = copy.deepcopy(backbone)
    with torch.no_grad():
        clone.transformer.mlm_layer.conv2.weight.mul_(2.0)  # after the head's RMSNorm
        tokens = torch.full((1, SIDE * SIDE), backbone.mask_token_id)
        cond = backbone.encode_prompts(["x"])
        a, b = backbone(tokens, cond, torch.ones(1)), clone(tokens, cond, torch.ones(1))
    assert torch.equal(a.features, b.features)  # the change is after the head's input
    assert not torch.equal(a.logits, b.logits)
