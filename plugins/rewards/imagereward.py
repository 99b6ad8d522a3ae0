"""ImageReward (Xu et al., 2023) as a :class:`~mdmrl.interfaces.Rewarder`.

The model is the ``ImageReward`` class of the ``image-reward`` package (a BLIP
ViT-L/16 image encoder, a BERT text encoder with cross-attention to the image, and an
MLP head), built from a local ``med_config.json`` and a local BERT vocabulary, then
filled with the weights of ``ImageReward.pt`` loaded weights-only. Scores are the
package's own: the head's output standardised with its fixed mean and standard
deviation, so about 0 on average over its training data, higher is better.

Heavy imports (the ``ImageReward`` package, transformers, torchvision) happen when the
model is first loaded, never at import.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext
from mdmrl_plugins.rewards.common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CachedModelRewarder,
    describe_keys,
    hub_file,
    load_weights,
    local_path,
    looks_like_path,
    missing_weights,
    normalize,
    resize_shortest_center_crop,
    resolve_device,
)

#: Hub repository holding ``ImageReward.pt`` and ``med_config.json``.
IMAGEREWARD_REPO = "THUDM/ImageReward"
#: The name ``checkpoint`` takes to mean "ImageReward.pt from the hub".
IMAGEREWARD_HUB_NAME = "ImageReward-v1.0"
#: Hub repository of the BERT vocabulary the text encoder was trained with.
BERT_REPO = "bert-base-uncased"
#: Image side ImageReward's visual encoder expects.
IMAGE_SIZE = 224
#: Prompts are padded or cut to this many BERT tokens, as in ImageReward's own code.
TEXT_LENGTH = 35
#: State-dict entries a checkpoint may lack: buffers rebuilt at construction and the
#: contrastive projections that scoring never uses.
_OPTIONAL_KEYS = ("position_ids", "blip.vision_proj.", "blip.text_proj.")

#: ImageReward's constructor builds its tokenizer through a module-level function;
#: swapping it for a local one must not race with another construction.
_BUILD_LOCK = threading.Lock()


@dataclass
class ImageRewardOptions:
    checkpoint: str = field(
        default=IMAGEREWARD_HUB_NAME,
        metadata={
            "doc": f'path to ImageReward.pt, or "{IMAGEREWARD_HUB_NAME}" for the file of hub repo '
            f"{IMAGEREWARD_REPO} (cache, else download)"
        },
    )
    med_config: str | None = field(
        default=None,
        metadata={"doc": f"path to med_config.json; none takes it from hub repo {IMAGEREWARD_REPO}"},
    )
    tokenizer: str = field(
        default=BERT_REPO,
        metadata={
            "doc": "bert-base-uncased vocabulary: a vocab.txt file, a folder holding one, or a hub repo id"
        },
    )
    batch_size: int = field(default=8, metadata={"doc": "images scored per forward pass", "min": 1})
    device: str | None = field(
        default=None, metadata={"doc": "device of the reward model; none uses the trainer's device"}
    )
    allow_pickle: bool = field(
        default=False,
        metadata={"doc": "load a checkpoint that stores Python objects besides tensors (trusted files only)"},
    )


@dataclass(frozen=True)
class ImageRewardFiles:
    """The three local files an ImageReward model is built from."""

    checkpoint: str
    med_config: str
    vocab: str


def locate_files(options: ImageRewardOptions, recipe_dir: str = ".") -> ImageRewardFiles:
    """Resolve every file to a local path (hub cache or download only for the hub
    names, and never while ``HF_HUB_OFFLINE`` is set). Raises one :class:`UserError`
    listing everything that is missing."""
    name = ImageRewardRewarder.name
    problems: list[str] = []

    checkpoint = local_path(options.checkpoint, recipe_dir)
    if checkpoint is None and options.checkpoint == IMAGEREWARD_HUB_NAME:
        checkpoint = hub_file(IMAGEREWARD_REPO, "ImageReward.pt")
    if checkpoint is None or not os.path.isfile(checkpoint):
        what = f'checkpoint "{options.checkpoint}"'
        problems.append(missing_weights(name, what, IMAGEREWARD_REPO, "ImageReward.pt", "checkpoint"))

    if options.med_config is None:
        med_config = hub_file(IMAGEREWARD_REPO, "med_config.json")
        what = "med_config.json (option med_config is unset)"
    else:
        med_config = local_path(options.med_config, recipe_dir)
        what = f'med_config "{options.med_config}"'
    if med_config is None or not os.path.isfile(med_config):
        problems.append(missing_weights(name, what, IMAGEREWARD_REPO, "med_config.json", "med_config"))

    vocab = local_path(options.tokenizer, recipe_dir)
    from_hub = (
        vocab is None and not looks_like_path(options.tokenizer) and not options.tokenizer.endswith(".txt")
    )
    if vocab is not None and os.path.isdir(vocab):
        vocab = os.path.join(vocab, "vocab.txt")
    elif from_hub:
        vocab = hub_file(options.tokenizer, "vocab.txt")
    if vocab is None or not os.path.isfile(vocab):
        repo = options.tokenizer if from_hub else BERT_REPO
        what = f'tokenizer vocabulary "{options.tokenizer}"'
        problems.append(missing_weights(name, what, repo, "vocab.txt", "tokenizer"))

    if problems:
        raise UserError(f"{name}: " + "; ".join(problems))
    return ImageRewardFiles(checkpoint, med_config, vocab)  # type: ignore[arg-type]


def bert_tokenizer(vocab_file: str) -> Any:
    """The text tokenizer ImageReward expects: bert-base-uncased's word pieces plus a
    ``[DEC]`` beginning-of-sequence token and an ``[ENC]`` token, whose id is kept as
    ``enc_token_id`` (BLIP's convention)."""
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab_file=vocab_file, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.additional_special_tokens_ids[0]
    return tok


@contextmanager
def _local_tokenizer(tokenizer: Any) -> Iterator[None]:
    """While active, ImageReward's BLIP constructor receives ``tokenizer`` instead of
    fetching bert-base-uncased from the hub."""
    from ImageReward.models.BLIP import blip_pretrain

    with _BUILD_LOCK:
        original = blip_pretrain.init_tokenizer
        blip_pretrain.init_tokenizer = lambda: tokenizer
        try:
            yield
        finally:
            blip_pretrain.init_tokenizer = original


def build_model(files: ImageRewardFiles, device: torch.device) -> Any:
    """An ``ImageReward.ImageReward`` model with random weights, in eval mode on the CPU
    (its ``device`` attribute, used for the attention masks it creates, is ``device``)."""
    from ImageReward.ImageReward import ImageReward as ImageRewardModel

    with _local_tokenizer(bert_tokenizer(files.vocab)):
        model = ImageRewardModel(med_config=files.med_config, device=device)
    return model.eval()


class ImageRewardRewarder(CachedModelRewarder):
    """ImageReward score of each (image, prompt) pair, float32 [B]."""

    name = "image-reward"
    Options = ImageRewardOptions

    def __init__(self, options: ImageRewardOptions, device: torch.device, files: ImageRewardFiles):
        super().__init__(options, device)
        self.files = files

    @classmethod
    def from_options(cls, options: ImageRewardOptions, ctx: BuildContext) -> ImageRewardRewarder:
        device = resolve_device(options.device, ctx.device, cls.name)
        return cls(options, device, locate_files(options, ctx.recipe_dir))

    def _load(self) -> Any:
        model = build_model(self.files, self.device)
        state = load_weights(self.files.checkpoint, reward=self.name, allow_pickle=self.options.allow_pickle)
        if not isinstance(state, dict):
            raise UserError(
                f"{self.name}: {self.files.checkpoint} holds a {type(state).__name__}, not a state dict"
            )
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not any(p in k for p in _OPTIONAL_KEYS)]
        if missing:
            raise UserError(
                f"{self.name}: {self.files.checkpoint} does not fit the model built from "
                f"{self.files.med_config}: {describe_keys(missing)} weights missing; use ImageReward.pt "
                f"from hub repo {IMAGEREWARD_REPO}"
            )
        return model.to(self.device)

    def _score_chunk(self, model: Any, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images float32 [b, 3, H, W] -> ImageReward scores float [b]."""
        x = normalize(resize_shortest_center_crop(images, IMAGE_SIZE), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        text = model.blip.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=TEXT_LENGTH, return_tensors="pt"
        ).to(self.device)
        rewards = model.score_gard(text.input_ids, text.attention_mask, x)  # [b, 1]
        return rewards[:, 0]
