"""``amused``: aMUSEd (diffusers ``UVit2DModel`` + ``VQModel``, CLIP text encoder) as an
mdmrl :class:`Backbone`.

Parts (subfolders of the published ``amused/amused-256`` or ``amused/amused-512``
repository, which also holds ``scheduler/``):

- ``transformer/``: ``UVit2DModel`` (the masked-token predictor);
- ``text_encoder/`` + ``tokenizer/``: ``CLIPTextModelWithProjection``, ``CLIPTokenizer``,
  frozen;
- ``vqvae/``: ``VQModel`` decoding token ids (``lookup_from_codebook``), frozen.

Conventions, all as aMUSEd's pipeline (``AmusedPipeline.__call__``) does it:

- text: prompts padded/truncated to 77 CLIP tokens; ``Conditioning.hidden`` = the
  penultimate hidden states [B, 77, D_text], ``pooled`` = ``text_embeds`` [B, P]; the
  null prompt is ``""``;
- timestep: ``UVit2DModel`` takes no timestep (the masked fraction is visible in the
  input itself), so the ``timestep`` argument of :meth:`AmusedBackbone.forward` is
  accepted and not used;
- micro-conditioning: [width, height, crop x, crop y, aesthetic score] =
  [resolution, resolution, 0, 0, 6];
- mask id: ``scheduler/scheduler_config.json``'s ``mask_token_id`` when present, else
  the transformer's ``vocab_size - 1`` (8255 for the published weights);
- logits: the MLM head's [B, V, H, W] output as [B, N, V] float32 (V = codebook_size);
- features: the input of the MLM head (``transformer.mlm_layer``), i.e. the up-block
  output [B, block_out_channels, H, W], as [B, N, D]; read with a forward pre-hook.

The null prompt's conditioning is encoded once per batch size and reused (the text
encoder is frozen); an in-place change of the text encoder's weights (a checkpoint
load) or a move to another device or dtype encodes it again.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import Backbone, BuildContext, NullConditioningCache
from mdmrl.trajectory import BackboneOutput, Conditioning

HUB_ID = "amused/amused-256"
SUBFOLDERS: tuple[str, ...] = ("transformer", "vqvae", "text_encoder", "tokenizer")
TEXT_LENGTH = 77
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: Images decoded per VQ decoder call.
DECODE_CHUNK = 8
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Attribute of ``transformer.mlm_layer`` where the feature hook leaves its input.
_FEATURE_ATTR = "mdmrl_head_input"


@dataclass
class AmusedOptions:
    """Recipe options of the ``amused`` backbone."""

    path: str = field(
        default=HUB_ID,
        metadata={
            "doc": "local folder holding transformer/, vqvae/, text_encoder/, tokenizer/ (relative paths are "
            "resolved against the recipe folder first), or a hub id such as amused/amused-256 or "
            "amused/amused-512 (read from the local cache when HF_HUB_OFFLINE is set)"
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "doc": "dtype of the transformer and text encoder (the VQ decoder stays float32)",
            "choices": list(DTYPES),
        },
    )
    resolution: int | None = field(
        default=None,
        metadata={
            "doc": "image side in pixels; unset = the transformer's sample_size times the VQ downsampling "
            "(256 for amused-256, 512 for amused-512)",
            "min": 1,
        },
    )
    variant: str | None = field(
        default=None, metadata={"doc": "weight file variant to load, e.g. fp16 (unset = the default files)"}
    )
    aesthetic_score: float = field(
        default=6.0, metadata={"doc": "aesthetic-score micro-condition (the pipeline's default is 6)"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"doc": "recompute transformer layers in backward to save activation memory"}
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _missing_weights(reason: str) -> UserError:
    return UserError(
        f"backbone.options.path: aMUSEd weights not found ({reason}); download the hub repo {HUB_ID} "
        f"(or amused/amused-512) with its subfolders {', '.join(s + '/' for s in SUBFOLDERS)} "
        f"(e.g. `huggingface-cli download {HUB_ID} --local-dir weights/amused-256`) and set "
        "backbone.options.path to that folder"
    )


def resolve_source(path: str, recipe_dir: str = ".") -> tuple[str, bool]:
    """Where to load from: (a local folder, True) or (a hub id, False).

    Raises UserError when ``path`` is neither an existing folder nor shaped like a hub
    id, or when a local folder lacks one of :data:`SUBFOLDERS`."""
    expanded = os.path.expanduser(path)
    candidates = [expanded] if os.path.isabs(expanded) else [os.path.join(recipe_dir, expanded), expanded]
    for cand in candidates:
        if os.path.isdir(cand):
            missing = [s for s in SUBFOLDERS if not os.path.isdir(os.path.join(cand, s))]
            if missing:
                raise _missing_weights(f"folder {cand!r} lacks {', '.join(m + '/' for m in missing)}")
            return cand, True
    if _HUB_ID_RE.fullmatch(path) and not path.startswith((".", "~")):
        return path, False
    raise _missing_weights(f"folder {candidates[0]!r} does not exist")


def load_components(options: AmusedOptions, recipe_dir: str = ".") -> tuple[Any, Any, Any, Any, int | None]:
    """Load (transformer, vqvae, text_encoder, tokenizer, mask id or None) with
    ``from_pretrained``. Missing files raise one UserError line saying what to download."""
    from diffusers import UVit2DModel, VQModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    source, local = resolve_source(options.path, recipe_dir)
    hub: dict[str, Any] = {} if local else {"local_files_only": _offline()}
    variant: dict[str, Any] = {"variant": options.variant} if options.variant else {}
    dtype = DTYPES[options.dtype]

    def load(what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as err:  # diffusers/transformers/huggingface_hub report missing files as OSError
            where = (
                f"{source!r}"
                if local
                else f"hub id {source!r}" + (" with HF_HUB_OFFLINE set" if _offline() else "")
            )
            raise _missing_weights(
                f"{what} could not be read from {where}: {str(err).splitlines()[0][:160]}"
            ) from err

    transformer = load(
        "transformer/",
        UVit2DModel.from_pretrained,
        source,
        subfolder="transformer",
        torch_dtype=dtype,
        **hub,
        **variant,
    )
    vqvae = load(
        "vqvae/",
        VQModel.from_pretrained,
        source,
        subfolder="vqvae",
        torch_dtype=torch.float32,
        **hub,
        **variant,
    )
    text_encoder = load(
        "text_encoder/",
        CLIPTextModelWithProjection.from_pretrained,
        source,
        subfolder="text_encoder",
        torch_dtype=dtype,
        **hub,
        **variant,
    )
    tokenizer = load("tokenizer/", CLIPTokenizer.from_pretrained, source, subfolder="tokenizer", **hub)
    mask_id = None
    sched_cfg = os.path.join(source, "scheduler", "scheduler_config.json")
    if local and os.path.isfile(sched_cfg):
        with open(sched_cfg, encoding="utf-8") as fh:
            mask_id = json.load(fh).get("mask_token_id")
    return transformer, vqvae, text_encoder, tokenizer, mask_id


def _capture_head_input(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook on the MLM head: keep its input (the final-layer features)."""
    setattr(module, _FEATURE_ATTR, args[0])


class AmusedBackbone(Backbone):
    """aMUSEd behind the mdmrl Backbone interface; see the module docstring."""

    name = "amused"
    Options = AmusedOptions

    def __init__(
        self,
        transformer,
        vqvae,
        text_encoder,
        tokenizer,
        options: AmusedOptions | None = None,
        mask_token_id: int | None = None,
    ):
        super().__init__()
        o = options or AmusedOptions()
        self.options = o
        dtype = DTYPES[o.dtype]
        self.transformer = transformer if transformer.dtype == dtype else transformer.to(dtype)
        self.text_encoder = (text_encoder if text_encoder.dtype == dtype else text_encoder.to(dtype)).eval()
        self.vqvae = (vqvae if vqvae.dtype == torch.float32 else vqvae.to(torch.float32)).eval()
        self.text_encoder.requires_grad_(False)
        self.vqvae.requires_grad_(False)
        self.tokenizer = tokenizer

        cfg = self.transformer.config
        self.codebook_size = int(cfg.codebook_size)
        self.mask_token_id = int(cfg.vocab_size) - 1 if mask_token_id is None else int(mask_token_id)
        self.feature_dim = int(cfg.block_out_channels)
        self._check_parts()
        scale = 2 ** (len(self.vqvae.config.block_out_channels) - 1)
        resolution = o.resolution if o.resolution is not None else int(cfg.sample_size) * scale
        side = resolution // scale
        step = 2 if cfg.downsample else 1
        if resolution % scale or side % step or side == 0:
            raise UserError(
                f"backbone.options.resolution: {resolution} must be a positive multiple of {scale * step} "
                f"(VQ downsampling {scale} x transformer downsampling {step})"
            )
        self.resolution = resolution
        self.grid_shape = (side, side)
        micro = [resolution, resolution, 0.0, 0.0, o.aesthetic_score]
        self.register_buffer("micro_conds", torch.tensor([micro], dtype=torch.float32), persistent=False)
        self.transformer.mlm_layer.register_forward_pre_hook(_capture_head_input)
        #: the null condition, reused while the text encoder is unchanged; see :meth:`null_conditioning`
        self._null_cache = NullConditioningCache()
        if o.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def _check_parts(self) -> None:
        cfg, te, vq = self.transformer.config, self.text_encoder.config, self.vqvae.config
        problems = []
        if int(vq.num_vq_embeddings) != self.codebook_size:
            problems.append(
                f"vqvae num_vq_embeddings {vq.num_vq_embeddings} != transformer codebook_size {self.codebook_size}"
            )
        if not getattr(vq, "lookup_from_codebook", False):
            problems.append("vqvae config must set lookup_from_codebook = true (decode from token ids)")
        if int(te.hidden_size) != int(cfg.encoder_hidden_size):
            problems.append(
                f"text_encoder hidden_size {te.hidden_size} != transformer encoder_hidden_size {cfg.encoder_hidden_size}"
            )
        if int(te.projection_dim) != int(cfg.cond_embed_dim):
            problems.append(
                f"text_encoder projection_dim {te.projection_dim} != transformer cond_embed_dim {cfg.cond_embed_dim}"
            )
        if not self.codebook_size <= self.mask_token_id < int(cfg.vocab_size):
            problems.append(
                f"mask token id {self.mask_token_id} must lie in [codebook_size {self.codebook_size}, "
                f"vocab_size {cfg.vocab_size})"
            )
        if problems:
            raise UserError(
                "backbone.options.path: the aMUSEd parts do not fit together: " + "; ".join(problems)
            )

    # ------------------------------------------------------------------ building

    @classmethod
    def from_options(cls, options: AmusedOptions, ctx: BuildContext) -> AmusedBackbone:
        transformer, vqvae, text_encoder, tokenizer, mask_id = load_components(options, ctx.recipe_dir)
        backbone = cls(transformer, vqvae, text_encoder, tokenizer, options=options, mask_token_id=mask_id)
        return backbone.to(ctx.device)

    @classmethod
    def from_modules(
        cls,
        transformer,
        vqvae,
        text_encoder,
        tokenizer,
        options: AmusedOptions | None = None,
        mask_token_id: int | None = None,
    ) -> AmusedBackbone:
        """Wrap already-built parts (tests, notebooks). ``options`` supplies dtype,
        resolution and micro-conditioning; its ``path`` is ignored."""
        return cls(transformer, vqvae, text_encoder, tokenizer, options=options, mask_token_id=mask_token_id)

    def export(self, out_dir: str | os.PathLike) -> dict:
        """``mdmrl export``: a diffusers ``AmusedPipeline`` folder (``save_pretrained``):
        ``transformer/`` (``UVit2DModel``), ``vqvae/``, ``text_encoder/``, ``tokenizer/``,
        ``scheduler/`` (``AmusedScheduler`` with this backbone's mask id and the
        published cosine masking schedule) and ``model_index.json``.
        ``UVit2DModel.from_pretrained(out_dir, subfolder="transformer")`` and
        ``AmusedPipeline.from_pretrained(out_dir)`` load it, ``backbone.options.path``
        too."""
        from diffusers import AmusedPipeline, AmusedScheduler

        pipeline = AmusedPipeline(
            vqvae=self.vqvae,
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            transformer=self.transformer,
            scheduler=AmusedScheduler(mask_token_id=self.mask_token_id, masking_schedule="cosine"),
        )
        pipeline.save_pretrained(str(out_dir))
        return {
            "format": "diffusers AmusedPipeline folder",
            "load": "AmusedPipeline.from_pretrained('DIR'); UVit2DModel.from_pretrained('DIR', "
            "subfolder='transformer'); backbone.options.path = 'DIR'",
            "dtype": self.options.dtype,
            "base": self.options.path,
        }

    def train(self, mode: bool = True) -> AmusedBackbone:
        """Train mode for the transformer only; the frozen text encoder and VQ stay in eval."""
        super().train(mode)
        self.text_encoder.eval()
        self.vqvae.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.micro_conds.device

    # ------------------------------------------------------------------ interface

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """B prompts -> hidden [B, 77, D_text] (penultimate CLIP layer), pooled [B, P]
        (``text_embeds``), attention_mask bool [B, 77] (True = real token; the
        transformer attends to all 77 positions, as the pipeline does)."""
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
        )
        out = self.text_encoder(tok.input_ids.to(self.device), return_dict=True, output_hidden_states=True)
        dtype = DTYPES[self.options.dtype]
        return Conditioning(
            hidden=out.hidden_states[-2].to(dtype),
            pooled=out.text_embeds.to(dtype),
            attention_mask=tok.attention_mask.to(self.device).bool(),
        )

    def null_conditioning(self, batch_size: int) -> Conditioning:
        """The empty prompts' encoding, kept while B, the dtype and the frozen text
        encoder stay the same (:class:`~mdmrl.interfaces.NullConditioningCache`); do not
        modify it in place."""
        return self._null_cache.empty_prompts(
            self, batch_size, self.text_encoder.parameters(), DTYPES[self.options.dtype]
        )

    def forward(self, tokens: torch.Tensor, cond: Conditioning, timestep: torch.Tensor) -> BackboneOutput:
        """tokens long [B, N] (row-major grid), cond batch B, timestep unused (see the
        module docstring) -> logits float32 [B, N, V], features [B, N, D]."""
        b, n = tokens.shape
        h, w = self.grid_shape
        if n != h * w:
            raise ValueError(f"tokens have {n} positions, expected {h * w} for grid {self.grid_shape}")
        if cond.pooled is None:
            raise ValueError("aMUSEd needs Conditioning.pooled (CLIP text_embeds)")
        head = self.transformer.mlm_layer
        logits = self.transformer(
            tokens.view(b, h, w),
            micro_conds=self.micro_conds.to(cond.hidden.dtype).expand(b, -1),
            pooled_text_emb=cond.pooled,
            encoder_hidden_states=cond.hidden,
        )
        features = getattr(head, _FEATURE_ATTR)
        setattr(head, _FEATURE_ATTR, None)
        logits = logits.reshape(b, self.codebook_size, n).permute(0, 2, 1).float()
        return BackboneOutput(logits=logits, features=features.flatten(2).transpose(1, 2))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens long [B, N] (no mask) -> images float32 [B, 3, resolution, resolution] in [0, 1]."""
        h, w = self.grid_shape
        latent = int(self.vqvae.config.latent_channels)
        images = []
        for chunk in tokens.to(self.device).split(DECODE_CHUNK):
            shape = (chunk.shape[0], h, w, latent)
            images.append(
                self.vqvae.decode(chunk, force_not_quantize=True, shape=shape).sample.float().clamp(0, 1)
            )
        return torch.cat(images)
