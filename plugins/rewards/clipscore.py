"""CLIP score (Hessel et al., 2021) as a :class:`~mdmrl.interfaces.Rewarder`.

score = scale * max(cos(image, text), 0) with transformers' ``CLIPModel`` embeddings;
``scale`` is 100 by default, the usual convention of text-to-image papers and
torchmetrics (the ``clip-score`` package reports the bare mean cosine instead,
without the 100 and without the clamp at 0).

Preprocessing follows the checkpoint's ``preprocessor_config.json`` (shorter side to
``size``, centre crop to ``crop_size``, normalise with ``image_mean``/``image_std``)
but runs on tensors on the reward device: bicubic antialiased resizing in torch
instead of PIL on 8-bit images, which differs from CLIPProcessor by a fraction of a
grey level when the image has to be resized, and not at all when it does not.

transformers is imported when the model is first loaded, never at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext
from mdmrl_plugins.rewards.common import (
    CachedModelRewarder,
    cached_hub_file,
    download_hint,
    hub_offline,
    local_path,
    looks_like_path,
    normalize,
    resolve_device,
)

#: The checkpoint the clip-score package uses by default.
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


@dataclass
class CLIPScoreOptions:
    model: str = field(
        default=DEFAULT_CLIP,
        metadata={"doc": "CLIP checkpoint for transformers: a local folder or a hub repo id"},
    )
    scale: float = field(
        default=100.0,
        metadata={"doc": "score = scale * max(cos(image, text), 0)", "min_exclusive": 0.0},
    )
    batch_size: int = field(default=32, metadata={"doc": "images scored per forward pass", "min": 1})
    device: str | None = field(
        default=None, metadata={"doc": "device of the reward model; none uses the trainer's device"}
    )


def _missing(value: str, repo: str) -> UserError:
    name = CLIPScoreRewarder.name
    return UserError(
        f'{name}: CLIP model "{value}" not found: download the hub repo {repo} ({download_hint(repo)}; '
        f"config.json, model.safetensors, tokenizer and preprocessor_config.json files) and set option "
        f'model = "DIR" of the [[rewards]] entry named "{name}"'
    )


def locate_model(value: str, recipe_dir: str = ".") -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether it is only on the hub and must be
    downloaded). A local folder, a hub id in the cache, or a hub id to download when
    the hub is online; otherwise :class:`UserError`."""
    path = local_path(value, recipe_dir)
    if path is not None:
        return path, False
    if looks_like_path(value):
        raise _missing(value, DEFAULT_CLIP)
    if cached_hub_file(value, "config.json") is not None:
        return value, False
    if hub_offline():
        raise _missing(value, value)
    return value, True


class CLIPScoreRewarder(CachedModelRewarder):
    """CLIP score of each (image, prompt) pair, float32 [B] in [0, scale]."""

    name = "clip-score"
    Options = CLIPScoreOptions

    def __init__(self, options: CLIPScoreOptions, device: torch.device, source: str, download: bool = False):
        super().__init__(options, device)
        self.source = source
        self.download = download

    @classmethod
    def from_options(cls, options: CLIPScoreOptions, ctx: BuildContext) -> CLIPScoreRewarder:
        device = resolve_device(options.device, ctx.device, cls.name)
        source, download = locate_model(options.model, ctx.recipe_dir)
        return cls(options, device, source, download)

    def _load(self) -> dict[str, Any]:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        kw = {"local_files_only": not self.download or hub_offline()}
        try:
            model = CLIPModel.from_pretrained(self.source, **kw)
            tokenizer = AutoTokenizer.from_pretrained(self.source, **kw)
            processor = CLIPImageProcessor.from_pretrained(self.source, **kw)
        except (OSError, ValueError) as exc:
            repo = self.source if self.download else DEFAULT_CLIP
            raise UserError(f"{_missing(self.options.model, repo)} ({type(exc).__name__})") from None
        return {
            "model": model.to(self.device).eval(),
            "tokenizer": tokenizer,
            "resize": _resize_target(processor.size) if processor.do_resize else None,
            "crop": (int(processor.crop_size["height"]), int(processor.crop_size["width"]))
            if processor.do_center_crop
            else None,
            "mean": tuple(processor.image_mean),
            "std": tuple(processor.image_std),
            "max_length": int(model.config.text_config.max_position_embeddings),
        }

    def _score_chunk(self, model: dict[str, Any], images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images float32 [b, 3, H, W] -> scale * max(cos, 0) float [b]."""
        x = _resize_crop(images, model["resize"], model["crop"])
        x = normalize(x, model["mean"], model["std"])
        text = model["tokenizer"](
            prompts,
            padding="max_length",
            truncation=True,
            max_length=model["max_length"],
            return_tensors="pt",
        ).to(self.device)
        clip = model["model"]
        image_features = clip.get_image_features(pixel_values=x)  # [b, E]
        text_features = clip.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        cos = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
        return self.options.scale * cos.clamp(min=0.0)


def _resize_target(size: dict) -> int | tuple[int, int]:
    """An image processor's ``size``: an int (shorter side) or (height, width)."""
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    return int(size["height"]), int(size["width"])


def _resize_crop(
    images: torch.Tensor, resize: int | tuple[int, int] | None, crop: tuple[int, int] | None
) -> torch.Tensor:
    """Resize (shorter side to an int, or to exactly (h, w)), bicubic and antialiased,
    then centre-crop to ``crop`` (h, w); either step is skipped when None.
    [B, 3, H, W] -> [B, 3, h, w]."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if isinstance(resize, int) and min(images.shape[-2:]) != resize:
        images = TF.resize(images, resize, interpolation=InterpolationMode.BICUBIC, antialias=True)
    elif isinstance(resize, tuple) and tuple(images.shape[-2:]) != resize:
        images = TF.resize(images, list(resize), interpolation=InterpolationMode.BICUBIC, antialias=True)
    if crop is not None and tuple(images.shape[-2:]) != crop:
        images = TF.center_crop(images, list(crop))
    return images
