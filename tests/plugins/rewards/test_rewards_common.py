"""Shared reward helpers (preprocessing, devices, paths, weight loading, the cached
base class) and the plug-in's registration."""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext
from mdmrl_plugins.rewards import common


# -- preprocessing ---------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), size=st.integers(4, 32), fill=st.sampled_from([0.0, 0.25]))
def test_resize_longest_pad_keeps_the_aspect_and_centres(h, w, size, fill):
    """A white image becomes a centred white rectangle whose longer side is ``size``,
    surrounded by ``fill``."""
    out = common.resize_longest_pad(torch.ones(2, 3, h, w), size, fill=fill)
    assert out.shape == (2, 3, size, size)
    scale = size / max(h, w)
    nh, nw = (h, w) if scale == 1.0 else (max(1, round(h * scale)), max(1, round(w * scale)))
    top, left = (size - nh) // 2, (size - nw) // 2
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[top : top + nh, left : left + nw] = True
    torch.testing.assert_close(out[:, :, inside], torch.ones_like(out[:, :, inside]), atol=1e-4, rtol=0)
    assert (out[:, :, ~inside] == fill).all()
    assert max(nh, nw) == size


@settings(max_examples=25, deadline=None)
@given(h=st.integers(8, 48), w=st.integers(8, 48), size=st.integers(4, 32))
def test_resize_shortest_center_crop_shape_and_constants(h, w, size):
    out = common.resize_shortest_center_crop(torch.full((1, 3, h, w), 0.4), size)
    assert out.shape == (1, 3, size, size)
    torch.testing.assert_close(out, torch.full_like(out, 0.4), atol=1e-4, rtol=0)


def test_preprocessing_leaves_images_of_the_target_size_alone():
    x = torch.rand(2, 3, 24, 24)
    assert torch.equal(common.resize_shortest_center_crop(x, 24), x)
    assert torch.equal(common.resize_longest_pad(x, 24), x)
    y = common.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    torch.testing.assert_close(y[:, 1], (x[:, 1] - 0.5) / 0.5)


def test_center_crop_takes_the_middle():
    x = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 3, 4, 6) / 10  # columns 0..5
    out = common.resize_shortest_center_crop(x, 4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.1, 0.2, 0.3, 0.4]))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 50), size=st.integers(1, 12))
def test_chunks_cover_the_batch_in_order(n, size):
    parts = list(common.chunks(n, size))
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    assert all(0 < p.stop - p.start <= size for p in parts)


# -- devices, paths, hub --------------------------------------------------------------------
def test_resolve_device():
    assert common.resolve_device(None, torch.device("cpu"), "r") == torch.device("cpu")
    assert common.resolve_device("cpu", torch.device("meta"), "r") == torch.device("cpu")
    with pytest.raises(UserError, match='r: option device = "gpu please" is not a torch device'):
        common.resolve_device("gpu please", torch.device("cpu"), "r")
    if torch.cuda.is_available():
        assert common.resolve_device("cuda", torch.device("cpu"), "r").type == "cuda"
    else:
        with pytest.raises(UserError, match="no CUDA device is available"):
            common.resolve_device("cuda", torch.device("cpu"), "r")


def test_local_path_prefers_the_given_path_then_the_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "weights.pt").write_bytes(b"x")
    assert common.local_path("weights.pt", str(tmp_path)) == str(tmp_path / "weights.pt")
    assert common.local_path(str(tmp_path / "weights.pt"), "/elsewhere") == str(tmp_path / "weights.pt")
    assert common.local_path("other.pt", str(tmp_path)) is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert common.local_path("~/weights.pt") == str(tmp_path / "weights.pt")


@pytest.mark.parametrize(
    "value,is_path",
    [
        ("openai/clip-vit-base-patch32", False),
        ("bert-base-uncased", False),
        ("./clip", True),
        ("~/models/clip", True),
        ("/models/clip", True),
        ("models/openai/clip", True),
    ],
)
def test_looks_like_path(value, is_path):
    assert common.looks_like_path(value) is is_path


def test_hub_offline_reads_the_environment(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    for value, expected in [("1", True), ("true", True), ("0", False), ("", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert common.hub_offline() is expected


def test_hub_file_offline_never_downloads(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("network access while offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    started = time.perf_counter()
    assert common.hub_file("THUDM/ImageReward", "ImageReward.pt") is None
    assert time.perf_counter() - started < 1.0


# -- weights --------------------------------------------------------------------------------
def test_load_weights_is_weights_only_unless_allowed(tmp_path):
    plain, pickled, junk = tmp_path / "plain.pt", tmp_path / "pickled.pt", tmp_path / "junk.pt"
    torch.save({"w": torch.ones(2)}, plain)
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, pickled)
    junk.write_text("not a checkpoint")
    assert torch.equal(common.load_weights(str(plain), reward="r")["w"], torch.ones(2))
    with pytest.raises(UserError, match=r"^r: .*pickled\.pt stores Python objects .* allow_pickle = true$"):
        common.load_weights(str(pickled), reward="r")
    assert common.load_weights(str(pickled), reward="r", allow_pickle=True)["args"].lr == 0.1
    with pytest.raises(UserError, match=r"junk\.pt is not a torch checkpoint"):
        common.load_weights(str(junk), reward="r")


# -- the cached base class ------------------------------------------------------------------
@dataclass
class _Opts:
    batch_size: int = 2


class _SlowMean(common.CachedModelRewarder):
    """Scores the mean pixel; its 'model' takes a while to load and counts loads."""

    name = "slow-mean"
    loads = 0

    def _load(self):
        type(self).loads += 1
        time.sleep(0.2)
        return torch.nn.Identity()

    def _score_chunk(self, model, images, prompts):
        assert images.shape[0] <= self.options.batch_size and images.device == self.device
        return model(images).mean(dim=(1, 2, 3))


def _batch(images, prompts):
    from mdmrl.interfaces import GeneratedBatch

    return GeneratedBatch(
        prompts=prompts, tokens=torch.zeros(len(prompts), 1), grid_shape=(1, 1), _images=images
    )


def test_concurrent_first_scores_load_the_model_once():
    rw = _SlowMean(_Opts(), torch.device("cpu"))
    _SlowMean.loads = 0
    images = torch.rand(5, 3, 4, 4)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(rw.score(_batch(images, ["p"] * 5)))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _SlowMean.loads == 1 and len(results) == 3
    for r in results:
        torch.testing.assert_close(r, images.mean(dim=(1, 2, 3)))


def test_score_checks_shapes_and_handles_an_empty_batch():
    rw = _SlowMean(_Opts(), torch.device("cpu"))
    with pytest.raises(ValueError, match="images must be"):
        rw.score(_batch(torch.rand(2, 1, 4, 4), ["a", "b"]))
    with pytest.raises(ValueError, match="images must be"):
        rw.score(_batch(torch.rand(3, 3, 4, 4), ["a", "b"]))
    empty = rw.score(_batch(torch.rand(0, 3, 4, 4), []))
    assert empty.shape == (0,) and empty.dtype == torch.float32 and not rw.loaded


def test_pickling_drops_the_loaded_model():
    rw = _SlowMean(_Opts(), torch.device("cpu"))
    rw.load()
    copy = pickle.loads(pickle.dumps(rw))
    assert rw.loaded and not copy.loaded
    images = torch.rand(3, 3, 4, 4)
    torch.testing.assert_close(copy.score(_batch(images, ["a"] * 3)), rw.score(_batch(images, ["a"] * 3)))


# -- registration -----------------------------------------------------------------------------
def test_plugin_registers_the_three_rewarders():
    from mdmrl.plugins import Registry
    from mdmrl_plugins.rewards import plugin

    reg = Registry()
    reg.register_plugin(plugin, "rewards")
    assert {"image-reward", "hpsv2", "clip-score"} <= set(reg.names("rewarder"))
    for name in ("image-reward", "hpsv2", "clip-score"):
        cls = reg.get("rewarder", name).cls
        assert cls.name == name and cls.Options is not None


def test_options_are_validated_by_the_recipe_schema():
    from mdmrl.options import build
    from mdmrl_plugins.rewards.clipscore import CLIPScoreOptions
    from mdmrl_plugins.rewards.hps import HPSv2Options
    from mdmrl_plugins.rewards.imagereward import ImageRewardOptions

    for cls in (ImageRewardOptions, HPSv2Options, CLIPScoreOptions):
        problems: list[str] = []
        build(cls, {"batch_size": 0, "device": 3}, "rewards[0].options", problems)
        assert any("batch_size" in p and "minimum" in p for p in problems), problems
        assert any("device" in p for p in problems), problems
    problems = []
    opts = build(ImageRewardOptions, {"checkpoint": "w/ImageReward.pt", "allow_pickle": True}, "o", problems)
    assert (
        problems == [] and opts.checkpoint == "w/ImageReward.pt" and opts.allow_pickle and opts.device is None
    )


def test_registering_imports_no_reward_library():
    """Listing plug-ins must stay cheap: the reward libraries load with their models."""
    code = (
        "import sys\n"
        "from mdmrl_plugins.rewards import plugin\n"
        "found = []\n"
        "plugin.register_rewarders(found.append)\n"
        "assert [c.name for c in found] == ['image-reward', 'hpsv2', 'clip-score'], found\n"
        "heavy = {'ImageReward', 'hpsv2', 'open_clip', 'transformers', 'torchvision', 'clip', 'timm'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_build_context_device_is_the_default(tiny_open_clip, tiny_hps_checkpoint):
    from mdmrl_plugins.rewards.hps import HPSv2Options, HPSv2Rewarder

    ctx = BuildContext(device=torch.device("cpu"))
    rw = HPSv2Rewarder.from_options(
        HPSv2Options(checkpoint=str(tiny_hps_checkpoint), model=tiny_open_clip), ctx
    )
    assert rw.device == torch.device("cpu")
