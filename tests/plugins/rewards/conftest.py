"""Tiny, offline stand-ins for the reward models' files.

Nothing here downloads: the hub is switched off, its cache pointed at an empty folder,
and every model is a random-weight miniature of the real architecture built from the
libraries' own classes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from mdmrl.interfaces import BuildContext, GeneratedBatch

#: Name of the tiny open_clip config registered for the tests (width 32, 2 layers).
TINY_OPEN_CLIP = "mdmrl-test-tiny-clip"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

#: Words of the tiny BERT vocabulary (after the special tokens).
BERT_WORDS = "a an the of on in with cat dog red blue green photo painting house tree sky car".split()


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path_factory):
    """No network and an empty hub cache for every test here."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hub-cache")))


def _make_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """float32 [b, 3, h, w] in [0, 1] on the 8-bit grid (k / 255), so a PIL round trip
    is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 255.0


def _make_batch(images: torch.Tensor, prompts: list[str]) -> GeneratedBatch:
    b = images.shape[0]
    return GeneratedBatch(
        prompts=list(prompts), tokens=torch.zeros(b, 1, dtype=torch.long), grid_shape=(1, 1), _images=images
    )


def _to_pil(image: torch.Tensor):
    """float [3, H, W] on the 8-bit grid -> PIL RGB image."""
    from PIL import Image

    arr = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr)


@pytest.fixture(scope="session")
def make_images():
    """``make_images(b, h, w, seed=0)``: random images on the 8-bit grid."""
    return _make_images


@pytest.fixture(scope="session")
def make_batch():
    """``make_batch(images, prompts)``: a GeneratedBatch holding decoded images."""
    return _make_batch


@pytest.fixture(scope="session")
def to_pil():
    """``to_pil(image)``: float [3, H, W] on the 8-bit grid -> PIL image."""
    return _to_pil


@pytest.fixture(scope="session")
def tiny_open_clip_config() -> dict:
    return dict(TINY_OPEN_CLIP_CONFIG)


@pytest.fixture
def ctx(tmp_path) -> BuildContext:
    return BuildContext(device=torch.device("cpu"), recipe_dir=str(tmp_path))


# -- open_clip ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> str:
    """Register :data:`TINY_OPEN_CLIP` with open_clip; returns its name."""
    import open_clip

    folder = tmp_path_factory.mktemp("open-clip-configs")
    (folder / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    return TINY_OPEN_CLIP


@pytest.fixture(scope="session")
def tiny_hps_checkpoint(tiny_open_clip, tmp_path_factory) -> Path:
    """A random tiny open_clip model saved the way HPSv2 saves its checkpoints."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_open_clip, pretrained=None)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": model.state_dict()}, path)
    return path


# -- transformers CLIP ---------------------------------------------------------------------
def clip_bpe_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of OpenAI's CLIP BPE, written from the vocabulary file
    open_clip ships (the same 49408 tokens transformers' CLIPTokenizer expects)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def _save_tiny_hf_clip(folder: Path, bpe_folder: Path, positive: bool) -> Path:
    """Save a random tiny transformers CLIPModel (32x32 images), its tokenizer and image
    processor into ``folder`` as ``save_pretrained`` writes them. A random CLIP's
    embeddings share one dominant direction, so nearly every (image, text) cosine has
    the same sign; the text projection's sign is chosen to make them ``positive`` or not."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPTokenizerFast

    vocab_file, merges_file = clip_bpe_files(bpe_folder)
    CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77).save_pretrained(folder)
    tokenizer = CLIPTokenizerFast.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        ids = tokenizer(["a photo", "a red cat"], padding="max_length", return_tensors="pt").input_ids
        cos = torch.nn.functional.cosine_similarity(
            model.get_image_features(pixel_values=torch.randn(2, 3, 32, 32)),
            model.get_text_features(ids),
            dim=-1,
        )
        if (cos.mean() > 0) != positive:
            model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory) -> Path:
    """Folder of a tiny random CLIP whose cosines are (almost all) positive."""
    return _save_tiny_hf_clip(tmp_path_factory.mktemp("tiny-clip"), tmp_path_factory.mktemp("bpe"), True)


@pytest.fixture(scope="session")
def tiny_hf_clip_negative(tmp_path_factory) -> Path:
    """The same kind of folder with (almost all) negative cosines."""
    return _save_tiny_hf_clip(tmp_path_factory.mktemp("tiny-clip-neg"), tmp_path_factory.mktemp("bpe"), False)


# -- ImageReward ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bert_vocab(tmp_path_factory) -> Path:
    """A small word-piece vocabulary with BERT's special tokens."""
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_med_config(bert_vocab, tmp_path_factory) -> Path:
    """med_config.json of ImageReward's BLIP text encoder, shrunk to one layer (the
    width stays 768: ImageReward's MLP head is built for it). The vocabulary has room
    for the [DEC] and [ENC] tokens ImageReward adds."""
    n_words = len(bert_vocab.read_text().split())
    config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 12,
        "num_hidden_layers": 1,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": n_words + 2,
        "encoder_width": 768,
        "add_cross_attention": True,
    }
    path = tmp_path_factory.mktemp("med") / "med_config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def tiny_blip_vit(monkeypatch):
    """Make ImageReward's BLIP build a one-block, 32-wide ViT (224 px, 16 px patches)
    instead of ViT-L, so the whole model has about 5 M parameters."""
    from ImageReward.models.BLIP import blip_pretrain, vit

    def create_vit(*args, **kwargs):
        return vit.VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2), 32

    monkeypatch.setattr(blip_pretrain, "create_vit", create_vit)


@pytest.fixture
def tiny_imagereward_checkpoint(tiny_blip_vit, tiny_med_config, bert_vocab, tmp_path) -> Path:
    """Random weights of the tiny ImageReward model, saved as a plain state dict (the
    layout of ImageReward.pt)."""
    from mdmrl_plugins.rewards.imagereward import ImageRewardFiles, build_model

    torch.manual_seed(0)
    model = build_model(ImageRewardFiles("", str(tiny_med_config), str(bert_vocab)), torch.device("cpu"))
    with torch.no_grad():
        # ImageReward initialises its head with std 1/769 per layer, which makes random
        # scores differ only in the 8th digit; unit-gain weights make them differ visibly.
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.in_features**-0.5)
                layer.bias.normal_(0.0, 0.1)
    path = tmp_path / "ImageReward.pt"
    torch.save(model.state_dict(), path)
    return path
