"""The clip-score rewarder on a tiny random transformers CLIP model saved to a folder,
checked against CLIPProcessor + CLIPModel used the standard way."""

from __future__ import annotations

import pytest
import torch

from mdmrl.errors import UserError
from mdmrl_plugins.rewards.clipscore import CLIPScoreOptions, CLIPScoreRewarder

PROMPTS = ["a red cat", "a blue house", "a photo of a tree", "a green car", "a dog in the sky", "the sea"]


def build(ctx, folder, **kw) -> CLIPScoreRewarder:
    return CLIPScoreRewarder.from_options(CLIPScoreOptions(model=str(folder), **kw), ctx)


def reference_cosines(folder, images, prompts, to_pil) -> torch.Tensor:
    """cos(image, text) per pair through CLIPProcessor (PIL images) and CLIPModel."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    inputs = processor(text=prompts, images=[to_pil(x) for x in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs.pixel_values)
        txt = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1)


@pytest.mark.parametrize("negative", [False, True])
def test_matches_clip_processor_and_model(
    ctx, tiny_hf_clip, tiny_hf_clip_negative, make_images, make_batch, to_pil, negative
):
    """At the model's own resolution preprocessing is exact: score = scale * max(cos, 0)."""
    folder = tiny_hf_clip_negative if negative else tiny_hf_clip
    images = make_images(6, 32, 32, seed=4)
    cos = reference_cosines(folder, images, PROMPTS, to_pil)
    assert bool((cos < 0).all()) == negative and bool((cos > 0).all()) != negative
    got = build(ctx, folder).score(make_batch(images, PROMPTS))
    assert got.shape == (6,) and got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, 100.0 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)
    other = build(ctx, folder, scale=2.5).score(make_batch(images, PROMPTS))
    torch.testing.assert_close(other, 2.5 * cos.clamp(min=0), atol=1e-5, rtol=1e-4)


def test_resized_images_stay_close_to_clip_processor(ctx, tiny_hf_clip, make_images, make_batch, to_pil):
    """Larger, non-square images are resized in torch rather than PIL: close, not equal."""
    images = make_images(6, 80, 56, seed=5)
    cos = reference_cosines(tiny_hf_clip, images, PROMPTS, to_pil)
    got = build(ctx, tiny_hf_clip, scale=1.0).score(make_batch(images, PROMPTS))
    torch.testing.assert_close(got, cos.clamp(min=0), atol=5e-3, rtol=0.0)


def test_batching_gives_the_same_scores(ctx, tiny_hf_clip, make_images, make_batch):
    images = make_images(6, 40, 40, seed=6)
    prompts = [p + " with a long tail" * i for i, p in enumerate(PROMPTS)]  # varied lengths
    whole = build(ctx, tiny_hf_clip, batch_size=32).score(make_batch(images, prompts))
    threes = build(ctx, tiny_hf_clip, batch_size=3).score(make_batch(images, prompts))
    one = build(ctx, tiny_hf_clip, batch_size=1)
    singles = torch.cat([one.score(make_batch(images[i : i + 1], prompts[i : i + 1])) for i in range(6)])
    torch.testing.assert_close(threes, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(singles, whole, atol=1e-5, rtol=1e-5)


def test_model_is_loaded_once(ctx, monkeypatch, tiny_hf_clip, make_images, make_batch):
    from transformers import CLIPModel

    calls = []
    original = CLIPModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(counting))
    rw = build(ctx, tiny_hf_clip, batch_size=2)
    assert calls == [] and not rw.loaded
    for seed in range(3):
        rw.score(make_batch(make_images(3, 32, 32, seed=seed), PROMPTS[:3]))
    assert calls == [True]


def test_scores_depend_on_image_and_prompt(ctx, tiny_hf_clip, make_images, make_batch):
    rw = build(ctx, tiny_hf_clip, scale=1.0)
    images = make_images(4, 32, 32, seed=7)
    by_image = rw.score(make_batch(images, ["a photo of a tree"] * 4))
    by_prompt = rw.score(make_batch(images[:1].expand(4, -1, -1, -1), PROMPTS[:4]))
    for scores in (by_image, by_prompt):
        assert scores.min() >= 0.0 and scores.max() <= 1.0
        assert scores.unique().numel() == 4


@pytest.mark.parametrize(
    "model,repo",
    [
        ("/nonexistent/clip-folder", "openai/clip-vit-base-patch32"),  # a path that is not there
        ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),  # hub id, offline, empty cache
        ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    ],
)
def test_missing_model_names_the_download(ctx, model, repo):
    with pytest.raises(UserError) as err:
        CLIPScoreRewarder.from_options(CLIPScoreOptions(model=model), ctx)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("clip-score: ")
    assert f"download the hub repo {repo}" in msg and f'"{model}"' in msg
    assert 'set option model = "DIR"' in msg


def test_scale_must_be_positive():
    from mdmrl.options import build as build_options

    problems: list[str] = []
    build_options(CLIPScoreOptions, {"scale": 0.0}, "rewards[0].options", problems)
    assert problems and "scale" in problems[0]
