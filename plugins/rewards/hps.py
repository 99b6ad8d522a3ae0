"""HPSv2 / HPSv2.1 (Wu et al., 2023) as a :class:`~mdmrl.interfaces.Rewarder`.

An HPS checkpoint is a complete state dict of an open_clip ``ViT-H-14`` CLIP model
fine-tuned on human preferences, so the model is built with open_clip directly
(random initialisation, no pretrained download) and the checkpoint is loaded into it
once. The score is the one ``hpsv2.score()`` returns: the cosine similarity of the
L2-normalised image and text embeddings, no logit scale, no clamping (typically about
0.2-0.35), times the option ``scale`` (1 by default; the HPSv2 benchmark tables
report it times 100).

Preprocessing follows HPSv2's evaluation transform: resize so the longer side is the
model's image size (bicubic, antialiased), pad evenly with black to a square, then
normalise with OpenAI's CLIP mean and standard deviation.

open_clip is imported when the model is first loaded, never at import.
"""

from __future__ import annotations

import os
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
    missing_weights,
    normalize,
    resize_longest_pad,
    resolve_device,
)

#: Hub repository of the HPS checkpoints.
HPS_REPO = "xswu/HPSv2"
#: Checkpoint file names in :data:`HPS_REPO` (HPSv2.0 and HPSv2.1).
HPS_FILES = ("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt")


@dataclass
class HPSv2Options:
    checkpoint: str = field(
        default="HPS_v2.1_compressed.pt",
        metadata={
            "doc": f"path to an HPS checkpoint, or one of {', '.join(HPS_FILES)} for that file of hub repo "
            f"{HPS_REPO} (cache, else download)"
        },
    )
    model: str = field(default="ViT-H-14", metadata={"doc": "open_clip model config the checkpoint fits"})
    scale: float = field(
        default=1.0,
        metadata={
            "doc": "score = scale * cosine(image, text); 1 matches hpsv2.score(), 100 the benchmark tables"
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


def locate_checkpoint(options: HPSv2Options, recipe_dir: str = ".") -> str:
    """The checkpoint as a local file; a bare HPS file name is looked up in the hub
    cache (downloaded unless ``HF_HUB_OFFLINE`` is set). Raises :class:`UserError`."""
    path = local_path(options.checkpoint, recipe_dir)
    if path is None and options.checkpoint in HPS_FILES:
        path = hub_file(HPS_REPO, options.checkpoint)
    if path is not None and os.path.isfile(path):
        return path
    base = os.path.basename(options.checkpoint)
    filename = base if base in HPS_FILES else HPS_FILES[1]
    what = f'checkpoint "{options.checkpoint}"'
    raise UserError(
        f"{HPSv2Rewarder.name}: "
        + missing_weights(HPSv2Rewarder.name, what, HPS_REPO, filename, "checkpoint")
    )


def check_model_name(name: str) -> None:
    """Raise :class:`UserError` unless open_clip knows the model config ``name``."""
    import open_clip

    if name not in open_clip.list_models():
        raise UserError(
            f'{HPSv2Rewarder.name}: option model = "{name}" is not an open_clip model config; HPS checkpoints '
            f'fit "ViT-H-14" (see open_clip.list_models())'
        )


def hps_state_dict(checkpoint: Any, path: str) -> dict:
    """The model state dict inside an HPS checkpoint (``{"state_dict": ...}`` as the
    HPSv2 training code saves it, or a bare state dict), without DDP's ``module.``."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{HPSv2Rewarder.name}: {path} holds no state dict")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


class HPSv2Rewarder(CachedModelRewarder):
    """HPSv2 score of each (image, prompt) pair, float32 [B]."""

    name = "hpsv2"
    Options = HPSv2Options

    def __init__(self, options: HPSv2Options, device: torch.device, checkpoint: str):
        super().__init__(options, device)
        self.checkpoint = checkpoint

    @classmethod
    def from_options(cls, options: HPSv2Options, ctx: BuildContext) -> HPSv2Rewarder:
        device = resolve_device(options.device, ctx.device, cls.name)
        checkpoint = locate_checkpoint(options, ctx.recipe_dir)
        check_model_name(options.model)
        return cls(options, device, checkpoint)

    def _load(self) -> dict[str, Any]:
        import open_clip

        model = open_clip.create_model(self.options.model, pretrained=None, device="cpu")
        raw = load_weights(self.checkpoint, reward=self.name, allow_pickle=self.options.allow_pickle)
        state = hps_state_dict(raw, self.checkpoint)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(
                f'{self.name}: {self.checkpoint} does not fit open_clip model "{self.options.model}": '
                f"{describe_keys(result.missing_keys)} missing and {describe_keys(result.unexpected_keys)} "
                f"unexpected weights"
            )
        size = model.visual.image_size
        return {
            "model": model.to(self.device).eval(),
            "tokenizer": open_clip.get_tokenizer(self.options.model),
            "image_size": size if isinstance(size, int) else int(max(size)),
        }

    def _score_chunk(self, model: dict[str, Any], images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images float32 [b, 3, H, W] -> scale * cos(image, text) float [b]."""
        clip = model["model"]
        x = normalize(resize_longest_pad(images, model["image_size"]), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        tokens = model["tokenizer"](prompts).to(self.device)
        image_features = clip.encode_image(x, normalize=True)  # [b, E]
        text_features = clip.encode_text(tokens, normalize=True)  # [b, E]
        return self.options.scale * (image_features * text_features).sum(-1)
