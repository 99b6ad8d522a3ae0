"""The hpsv2 rewarder on a tiny random open_clip model, checked against HPSv2's own
model and preprocessing code."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

from mdmrl.errors import UserError
from mdmrl_plugins.rewards.hps import HPSv2Options, HPSv2Rewarder

PROMPTS = ["a red cat", "a blue house", "a photo of a tree", "a green car", "a dog in the sky"]


def build(ctx, checkpoint, model, **kw) -> HPSv2Rewarder:
    return HPSv2Rewarder.from_options(HPSv2Options(checkpoint=str(checkpoint), model=model, **kw), ctx)


def hpsv2_open_clip():
    """HPSv2's vendored open_clip modules (model and transform), imported without the
    package ``__init__``, which needs a vocabulary file the hpsv2 wheel lacks."""
    import hpsv2

    name = "_hpsv2_vendored_open_clip"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(Path(hpsv2.__file__).parent / "src" / "open_clip")]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.model"), importlib.import_module(f"{name}.transform")


def counting(fn, counter: list):
    def wrapper(*args, **kwargs):
        counter.append(1)
        return fn(*args, **kwargs)

    return wrapper


def test_scores_are_float32_cosines_on_cpu(ctx, tiny_open_clip, tiny_hps_checkpoint, make_images, make_batch):
    rw = build(ctx, tiny_hps_checkpoint, tiny_open_clip)
    scores = rw.score(make_batch(make_images(5, 40, 40), PROMPTS))
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert scores.abs().max() <= 1.0 + 1e-6
    hundred = build(ctx, tiny_hps_checkpoint, tiny_open_clip, scale=100.0)
    torch.testing.assert_close(hundred.score(make_batch(make_images(5, 40, 40), PROMPTS)), 100 * scores)


@pytest.mark.parametrize("height,width", [(48, 20), (64, 64), (17, 30)])
def test_matches_hpsv2_model_and_preprocessing(
    ctx,
    tiny_open_clip,
    tiny_hps_checkpoint,
    height,
    width,
    make_images,
    make_batch,
    to_pil,
    tiny_open_clip_config,
):
    """Same weights through HPSv2's own CLIP class and its evaluation transform (PIL in,
    resize the longer side, pad to a square) give the same scores."""
    import open_clip

    model_mod, transform_mod = hpsv2_open_clip()
    reference = model_mod.CLIP(**tiny_open_clip_config, output_dict=True)
    reference.load_state_dict(torch.load(tiny_hps_checkpoint, weights_only=True)["state_dict"])
    reference.eval()
    preprocess = transform_mod.image_transform(32, is_train=False, resize_longest_max=True)
    tokenize = open_clip.get_tokenizer(tiny_open_clip)

    images = make_images(3, height, width, seed=1)
    prompts = PROMPTS[:3]
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            out = reference(preprocess(to_pil(image)).unsqueeze(0), tokenize([prompt]))
            expected.append((out["image_features"] @ out["text_features"].T).diagonal()[0])
    got = build(ctx, tiny_hps_checkpoint, tiny_open_clip).score(make_batch(images, prompts))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_batching_gives_the_same_scores(ctx, tiny_open_clip, tiny_hps_checkpoint, make_images, make_batch):
    images = make_images(5, 36, 36, seed=2)
    batch = make_batch(images, PROMPTS)
    whole = build(ctx, tiny_hps_checkpoint, tiny_open_clip, batch_size=8).score(batch)
    pairs = build(ctx, tiny_hps_checkpoint, tiny_open_clip, batch_size=2).score(batch)
    one_rw = build(ctx, tiny_hps_checkpoint, tiny_open_clip, batch_size=1)
    singles = torch.cat([one_rw.score(make_batch(images[i : i + 1], PROMPTS[i : i + 1])) for i in range(5)])
    torch.testing.assert_close(pairs, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(singles, whole, atol=1e-6, rtol=1e-5)


def test_model_and_checkpoint_are_loaded_once(
    ctx, monkeypatch, tiny_open_clip, tiny_hps_checkpoint, make_images, make_batch
):
    import open_clip

    built, loads = [], []
    monkeypatch.setattr(open_clip, "create_model", counting(open_clip.create_model, built))
    monkeypatch.setattr(torch, "load", counting(torch.load, loads))
    rw = build(ctx, tiny_hps_checkpoint, tiny_open_clip, batch_size=2)
    assert (len(built), len(loads), rw.loaded) == (0, 0, False)  # nothing heavy at build time
    for seed in range(3):
        rw.score(make_batch(make_images(5, 32, 32, seed=seed), PROMPTS))
    assert (len(built), len(loads), rw.loaded) == (1, 1, True)


def test_scores_depend_on_image_and_prompt(ctx, tiny_open_clip, tiny_hps_checkpoint, make_images, make_batch):
    rw = build(ctx, tiny_hps_checkpoint, tiny_open_clip)
    images = make_images(4, 32, 32, seed=3)
    same_prompt = rw.score(make_batch(images, ["a red cat"] * 4))
    assert same_prompt.unique().numel() == 4
    same_image = rw.score(make_batch(images[:1].expand(4, -1, -1, -1), PROMPTS[:4]))
    assert same_image.unique().numel() == 4


def test_checkpoint_is_found_next_to_the_recipe(tmp_path, tiny_open_clip, tiny_hps_checkpoint):
    from mdmrl.interfaces import BuildContext

    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(tiny_hps_checkpoint.read_bytes())
    rw = HPSv2Rewarder.from_options(
        HPSv2Options(checkpoint="HPS_v2.1_compressed.pt", model=tiny_open_clip),
        BuildContext(recipe_dir=str(tmp_path)),
    )
    assert rw.checkpoint == str(tmp_path / "HPS_v2.1_compressed.pt")


@pytest.mark.parametrize(
    "checkpoint,filename",
    [
        ("/nonexistent/weights/HPS_v2_compressed.pt", "HPS_v2_compressed.pt"),
        ("/nonexistent/weights/hps.pt", "HPS_v2.1_compressed.pt"),
        ("HPS_v2.1_compressed.pt", "HPS_v2.1_compressed.pt"),  # hub name, offline, empty cache
        ("HPS_v2_compressed.pt", "HPS_v2_compressed.pt"),
    ],
)
def test_missing_checkpoint_names_the_download(ctx, checkpoint, filename):
    with pytest.raises(UserError) as err:
        HPSv2Rewarder.from_options(HPSv2Options(checkpoint=checkpoint), ctx)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("hpsv2: ")
    assert f"{filename} from the Hugging Face hub repo xswu/HPSv2" in msg
    assert "set option checkpoint" in msg and checkpoint in msg


def test_checkpoint_of_another_model_is_a_user_error(
    ctx, tmp_path, tiny_open_clip, tiny_hps_checkpoint, make_images, make_batch
):
    state = torch.load(tiny_hps_checkpoint, weights_only=True)["state_dict"]
    del state["text_projection"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "other.pt"
    torch.save({"state_dict": state}, path)
    rw = build(ctx, path, tiny_open_clip)
    with pytest.raises(UserError, match=r"does not fit open_clip model .*1 \(text_projection\) missing"):
        rw.score(make_batch(make_images(1, 32, 32), ["a cat"]))


def test_unknown_model_config_is_a_user_error(ctx, tiny_hps_checkpoint):
    with pytest.raises(UserError, match='option model = "ViT-Q-99" is not an open_clip model config'):
        build(ctx, tiny_hps_checkpoint, "ViT-Q-99")
