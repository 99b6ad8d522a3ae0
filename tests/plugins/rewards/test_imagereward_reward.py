"""The image-reward rewarder on ImageReward's own model class, shrunk (one-block ViT,
one-layer text encoder) and filled with random weights, checked against the
package's own ``ImageReward.score``."""

from __future__ import annotations

import argparse

import pytest
import torch

from mdmrl.errors import UserError
from mdmrl_plugins.rewards.imagereward import ImageRewardOptions, ImageRewardRewarder

PROMPTS = ["a red cat", "a blue house", "a photo of a tree", "a green car", "a dog in the sky"]


def options(checkpoint, med_config, vocab, **kw) -> ImageRewardOptions:
    return ImageRewardOptions(
        checkpoint=str(checkpoint), med_config=str(med_config), tokenizer=str(vocab), **kw
    )


def build(ctx, checkpoint, med_config, vocab, **kw) -> ImageRewardRewarder:
    return ImageRewardRewarder.from_options(options(checkpoint, med_config, vocab, **kw), ctx)


def test_matches_the_packages_own_score(
    ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, make_images, make_batch, to_pil
):
    """224 px images need no resizing, so the batched tensor path equals ImageReward's
    one-PIL-image-at-a-time ``score``."""
    rw = build(ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, batch_size=4)
    images = make_images(5, 224, 224, seed=1)
    got = rw.score(make_batch(images, PROMPTS))
    assert got.shape == (5,) and got.dtype == torch.float32 and got.device.type == "cpu"
    model = rw.load()
    with torch.no_grad():
        expected = torch.tensor([model.score(p, to_pil(x)) for p, x in zip(PROMPTS, images)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_resized_images_stay_close_to_the_packages_score(
    ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, make_images, make_batch, to_pil
):
    """Other sizes are resized in torch rather than PIL: close, not equal."""
    rw = build(ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab)
    images = make_images(3, 256, 256, seed=2)
    got = rw.score(make_batch(images, PROMPTS[:3]))
    with torch.no_grad():
        expected = torch.tensor([rw.load().score(p, to_pil(x)) for p, x in zip(PROMPTS, images)])
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0.0)


def test_batching_gives_the_same_scores(
    ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, make_images, make_batch
):
    images = make_images(5, 224, 224, seed=3)
    batch = make_batch(images, PROMPTS)
    whole = build(ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, batch_size=8).score(batch)
    pairs = build(ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, batch_size=2).score(batch)
    one = build(ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, batch_size=1)
    singles = torch.cat([one.score(make_batch(images[i : i + 1], PROMPTS[i : i + 1])) for i in range(5)])
    torch.testing.assert_close(pairs, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(singles, whole, atol=1e-5, rtol=1e-5)


def test_model_and_checkpoint_are_loaded_once(
    ctx, monkeypatch, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, make_images, make_batch
):
    from ImageReward.ImageReward import ImageReward as ImageRewardModel

    built, loads = [], []
    original_init, original_load = ImageRewardModel.__init__, torch.load

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original_init(self, *args, **kwargs)

    def counting_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original_load(*args, **kwargs)

    monkeypatch.setattr(ImageRewardModel, "__init__", counting_init)
    monkeypatch.setattr(torch, "load", counting_load)
    rw = build(ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, batch_size=2)
    assert (built, loads, rw.loaded) == ([], [], False)  # nothing heavy at build time
    for seed in range(3):
        rw.score(make_batch(make_images(3, 224, 224, seed=seed), PROMPTS[:3]))
    assert (built, loads, rw.loaded) == ([1], [True], True)  # once, and weights-only


def test_scores_depend_on_image_and_prompt(
    ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, make_images, make_batch
):
    rw = build(ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab)
    images = make_images(4, 224, 224, seed=4)
    by_image = rw.score(make_batch(images, ["a red cat"] * 4))
    by_prompt = rw.score(make_batch(images[:1].expand(4, -1, -1, -1), PROMPTS[:4]))
    assert by_image.unique().numel() == 4 and by_prompt.unique().numel() == 4


def test_pickled_checkpoint_needs_allow_pickle(
    ctx, tmp_path, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, make_images, make_batch
):
    state = torch.load(tiny_imagereward_checkpoint, weights_only=True)
    state["training_args"] = argparse.Namespace(lr=1e-5)  # a Python object besides the tensors
    path = tmp_path / "pickled.pt"
    torch.save(state, path)
    batch = make_batch(make_images(2, 224, 224, seed=5), PROMPTS[:2])
    with pytest.raises(UserError, match=r"refuses; if you trust the file, set option allow_pickle = true"):
        build(ctx, path, tiny_med_config, bert_vocab).score(batch)
    trusted = build(ctx, path, tiny_med_config, bert_vocab, allow_pickle=True).score(batch)
    plain = build(ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab).score(batch)
    torch.testing.assert_close(trusted, plain)


def test_checkpoint_missing_weights_is_a_user_error(
    ctx, tmp_path, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, make_images, make_batch
):
    state = torch.load(tiny_imagereward_checkpoint, weights_only=True)
    for key in [k for k in state if k.startswith("mlp.")]:
        del state[key]
    del state["blip.text_encoder.embeddings.position_ids"]  # optional: rebuilt at construction
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    rw = build(ctx, path, tiny_med_config, bert_vocab)
    with pytest.raises(UserError, match=r"does not fit the model built from .*: 10 \(mlp\.layers\.0\.weight"):
        rw.score(make_batch(make_images(1, 224, 224), ["a cat"]))


def test_missing_files_name_their_downloads(ctx):
    """Nonexistent paths and, offline with an empty cache, the hub defaults."""
    cases = [
        (options("/nonexistent/ImageReward.pt", "/nonexistent/med_config.json", "/nonexistent/vocab.txt"), 3),
        (
            ImageRewardOptions(),
            3,
        ),  # checkpoint "ImageReward-v1.0", med_config from the hub, bert-base-uncased
    ]
    for opts, count in cases:
        with pytest.raises(UserError) as err:
            ImageRewardRewarder.from_options(opts, ctx)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("image-reward: ")
        assert msg.count(" not found: download ") == count
        assert "ImageReward.pt from the Hugging Face hub repo THUDM/ImageReward" in msg
        assert 'set option checkpoint = "DIR/ImageReward.pt"' in msg
        assert "med_config.json from the Hugging Face hub repo THUDM/ImageReward" in msg
        assert 'set option med_config = "DIR/med_config.json"' in msg
        assert "vocab.txt from the Hugging Face hub repo bert-base-uncased" in msg
        assert 'set option tokenizer = "DIR/vocab.txt"' in msg


def test_only_the_missing_file_is_named(
    ctx, tiny_imagereward_checkpoint, tiny_med_config, bert_vocab, tmp_path
):
    with pytest.raises(UserError) as err:
        build(ctx, tmp_path / "nope" / "ImageReward.pt", tiny_med_config, bert_vocab)
    msg = str(err.value)
    assert msg.count(" not found: ") == 1 and "option checkpoint" in msg and "med_config" not in msg
    folder = bert_vocab.parent  # a folder holding vocab.txt is accepted too
    rw = build(ctx, tiny_imagereward_checkpoint, tiny_med_config, folder)
    assert rw.files.vocab == str(bert_vocab)
