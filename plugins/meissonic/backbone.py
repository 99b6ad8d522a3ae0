"""``meissonic``: the Meissonic text-to-image MDM as an mdmrl :class:`Backbone`.

Parts (each a subfolder of the published ``MeissonFlow/Meissonic`` repository):

- ``transformer/``: :class:`~mdmrl_plugins.meissonic.transformer.MeissonicTransformer2DModel`;
- ``text_encoder/`` + ``tokenizer/``: CLIP-ViT-H-14 (``CLIPTextModelWithProjection``,
  ``CLIPTokenizer``), frozen;
- ``vqvae/``: diffusers ``VQModel`` (codebook 8192, 16x downsampling: 64x64 tokens at
  1024x1024), frozen.

Conventions (see docs/meissonic.md):

- text: prompts padded/truncated to 77 CLIP tokens; ``Conditioning.hidden`` = the
  penultimate hidden states [B, 77, 1024], ``pooled`` = ``text_embeds`` [B, 1024]; the
  null prompt is ``""``;
- timestep: the masked fraction r is mapped to the scheduler timestep Meissonic's
  pipeline would pass at the step whose input has that mask ratio (:func:`pipeline_timestep`);
- micro-conditioning: [width, height, crop x, crop y, aesthetic score] =
  [resolution, resolution, 0, 0, 6] as in the pipeline;
- logits: [B, N, 8192] float32 (the head emits exactly the codebook; the 64 extra
  input ids 8192..8255, mask 8255 among them, have no logits);
- features: the up-block output, the MLM head's input, [B, N, 1024].
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import Backbone, BuildContext, NullConditioningCache
from mdmrl.trajectory import BackboneOutput, Conditioning

HUB_ID = "MeissonFlow/Meissonic"
SUBFOLDERS: tuple[str, ...] = ("transformer", "text_encoder", "tokenizer", "vqvae")
TEXT_LENGTH = 77
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: Modules LoRA adapts: every attention projection of both streams.
LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
#: Images decoded per VQ decoder call (bounds decoder activation memory at 1024x1024).
DECODE_CHUNK = 4
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class MeissonicOptions:
    """Recipe options of the ``meissonic`` backbone."""

    path: str = field(
        default=HUB_ID,
        metadata={
            "doc": "local folder holding transformer/, text_encoder/, tokenizer/, vqvae/ (relative paths "
            "are resolved against the recipe folder first), or a Hugging Face hub id (read from the "
            "local cache when HF_HUB_OFFLINE is set)"
        },
    )
    resolution: int = field(
        default=1024,
        metadata={"doc": "image side in pixels; the token grid is resolution / 16 per side", "min": 16},
    )
    dtype: str = field(
        default="float32",
        metadata={
            "doc": "dtype of the transformer and text encoder (the VQ decoder stays float32)",
            "choices": list(DTYPES),
        },
    )
    lora_rank: int = field(
        default=0,
        metadata={"doc": "rank of LoRA adapters on the attention projections; 0 = full fine-tune", "min": 0},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"doc": "recompute transformer blocks in backward to save activation memory"}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"doc": "accepted for compatibility and never used: no code from the weights folder is run"},
    )
    pipeline_steps: int = field(
        default=48,
        metadata={
            "doc": "step count T of the Meissonic pipeline whose timestep convention forward reproduces "
            "(the masked fraction is mapped to the timestep of the T-step cosine run at that mask ratio)",
            "min": 1,
        },
    )
    aesthetic_score: float = field(
        default=6.0, metadata={"doc": "aesthetic-score micro-condition (the pipeline's default is 6)"}
    )
    text_encoder_path: str | None = field(
        default=None,
        metadata={
            "doc": "folder or hub id of a CLIPTextModelWithProjection to use instead of <path>/text_encoder "
            "(Meissonic's inference script uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
        },
    )


def pipeline_timestep(masked_fraction: torch.Tensor, pipeline_steps: int) -> torch.Tensor:
    """Map the fraction of masked positions to Meissonic's pipeline timestep.

    The pipeline runs T = ``pipeline_steps`` steps; step i (0-based) passes the
    scheduler timestep T - 1 - i, and its input has mask ratio cos(pi/2 * i / T)
    (cosine schedule). Inverting: i = T * (2/pi) * arccos(r), rounded to the nearest
    step (the model saw only whole pipeline steps), so the timestep is
    ``clamp(T - 1 - round(i), 0, T - 1)``. r = 1 gives T - 1; r = 0 gives 0.

    masked_fraction: float [B] in [0, 1] -> float32 [B].
    """
    r = masked_fraction.float().clamp(0.0, 1.0)
    step = torch.round(pipeline_steps * (2.0 / math.pi) * torch.acos(r))
    return (pipeline_steps - 1 - step).clamp(0, pipeline_steps - 1)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _missing_weights(reason: str) -> UserError:
    return UserError(
        f"backbone.options.path: Meissonic weights not found ({reason}); download the hub repo {HUB_ID} "
        f"with its subfolders {', '.join(s + '/' for s in SUBFOLDERS)} "
        f"(e.g. `huggingface-cli download {HUB_ID} --local-dir weights/meissonic`) "
        "and set backbone.options.path to that folder"
    )


def _locate(path: str, recipe_dir: str) -> tuple[str, bool] | None:
    """(existing folder, True), (hub id, False), or None when ``path`` is neither.
    Relative folders are looked up under ``recipe_dir`` first, then the working directory."""
    expanded = os.path.expanduser(path)
    candidates = [expanded] if os.path.isabs(expanded) else [os.path.join(recipe_dir, expanded), expanded]
    for cand in candidates:
        if os.path.isdir(cand):
            return cand, True
    if _HUB_ID_RE.fullmatch(path) and not path.startswith((".", "~")):
        return path, False
    return None


def resolve_source(
    path: str, recipe_dir: str = ".", subfolders: tuple[str, ...] = SUBFOLDERS
) -> tuple[str, bool]:
    """Where to load the checkpoint from: (a local folder, True) or (a hub id, False).

    Raises UserError when ``path`` is neither an existing folder nor shaped like a hub
    id, or when a local folder lacks one of ``subfolders``.
    """
    found = _locate(path, recipe_dir)
    if found is None:
        raise _missing_weights(
            f"folder {path!r} does not exist (looked in {recipe_dir!r} and the working directory)"
        )
    source, local = found
    if local:
        missing = [s for s in subfolders if not os.path.isdir(os.path.join(source, s))]
        if missing:
            raise _missing_weights(f"folder {source!r} lacks {', '.join(m + '/' for m in missing)}")
    return source, local


def load_components(options: MeissonicOptions, recipe_dir: str = ".") -> tuple[Any, Any, Any, Any]:
    """Load (transformer, vqvae, text_encoder, tokenizer) with ``from_pretrained``.

    Missing files (a missing folder, or a hub id absent from the cache while
    HF_HUB_OFFLINE is set) raise one UserError line saying what to download.
    """
    from diffusers import VQModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from mdmrl_plugins.meissonic.transformer import MeissonicTransformer2DModel

    needed = tuple(s for s in SUBFOLDERS if not (s == "text_encoder" and options.text_encoder_path))
    source, local = resolve_source(options.path, recipe_dir, needed)
    dtype = DTYPES[options.dtype]

    def load(what: str, fn, src: str, is_local: bool, **kwargs):
        kwargs.update({} if is_local else {"local_files_only": _offline()})
        try:
            return fn(src, **kwargs)
        except OSError as err:  # diffusers/transformers/huggingface_hub report missing files as OSError
            if is_local:
                where = repr(src)
            else:
                offline = ", HF_HUB_OFFLINE set so only the local cache was read" if _offline() else ""
                where = f"hub id {src!r} (no local folder of that name{offline})"
            raise _missing_weights(
                f"{what} could not be read from {where}: {str(err).splitlines()[0][:160]}"
            ) from err

    transformer = load(
        "transformer/",
        MeissonicTransformer2DModel.from_pretrained,
        source,
        local,
        subfolder="transformer",
        torch_dtype=dtype,
    )
    vqvae = load(
        "vqvae/", VQModel.from_pretrained, source, local, subfolder="vqvae", torch_dtype=torch.float32
    )
    tokenizer = load("tokenizer/", CLIPTokenizer.from_pretrained, source, local, subfolder="tokenizer")
    if options.text_encoder_path:
        te_source, te_local = resolve_text_encoder(options.text_encoder_path, recipe_dir)
        text_encoder = load(
            "text_encoder_path",
            CLIPTextModelWithProjection.from_pretrained,
            te_source,
            te_local,
            torch_dtype=dtype,
        )
    else:
        text_encoder = load(
            "text_encoder/",
            CLIPTextModelWithProjection.from_pretrained,
            source,
            local,
            subfolder="text_encoder",
            torch_dtype=dtype,
        )
    return transformer, vqvae, text_encoder, tokenizer


def resolve_text_encoder(path: str, recipe_dir: str = ".") -> tuple[str, bool]:
    """(folder, True) or (hub id, False) for ``text_encoder_path``; UserError otherwise."""
    found = _locate(path, recipe_dir)
    if found is None:
        raise UserError(
            f"backbone.options.text_encoder_path: folder {path!r} does not exist; give a folder holding a "
            "CLIPTextModelWithProjection (config.json + weights) or a hub id such as "
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
        )
    return found


def add_lora(transformer: torch.nn.Module, rank: int) -> None:
    """Freeze the transformer and add trainable LoRA adapters (alpha = 2 * rank) on
    every attention projection (:data:`LORA_TARGETS`)."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS)))
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)


class MeissonicBackbone(Backbone):
    """Meissonic (1B masked-token transformer, CLIP-ViT-H-14, VQ-GAN) behind the mdmrl
    Backbone interface. See the module docstring for the conventions."""

    name = "meissonic"
    Options = MeissonicOptions

    def __init__(self, transformer, vqvae, text_encoder, tokenizer, options: MeissonicOptions | None = None):
        super().__init__()
        o = options or MeissonicOptions()
        self.options = o
        dtype = DTYPES[o.dtype]
        self.transformer = transformer if transformer.dtype == dtype else transformer.to(dtype)
        self.text_encoder = (text_encoder if text_encoder.dtype == dtype else text_encoder.to(dtype)).eval()
        self.vqvae = (vqvae if vqvae.dtype == torch.float32 else vqvae.to(torch.float32)).eval()
        self.text_encoder.requires_grad_(False)
        self.vqvae.requires_grad_(False)
        self.tokenizer = tokenizer
        #: the null condition, reused while the text encoder is unchanged; see :meth:`null_conditioning`
        self._null_cache = NullConditioningCache()

        cfg = transformer.config
        self.codebook_size = int(cfg.codebook_size)
        self.mask_token_id = int(cfg.vocab_size) - 1
        self.feature_dim = int(transformer.inner_dim)
        self._check_parts()
        scale = 2 ** (len(vqvae.config.block_out_channels) - 1)
        side = o.resolution // scale
        step = 2 if cfg.downsample else 1
        if o.resolution % scale or side % step or side == 0:
            raise UserError(
                f"backbone.options.resolution: {o.resolution} must be a multiple of {scale * step} "
                f"(VQ downsampling {scale} x transformer downsampling {step})"
            )
        self.grid_shape = (side, side)
        # micro-conditions: width, height, crop x, crop y, aesthetic score
        micro = [o.resolution, o.resolution, 0.0, 0.0, o.aesthetic_score]
        self.register_buffer("micro_conds", torch.tensor([micro], dtype=torch.float32), persistent=False)

        if o.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if o.lora_rank > 0:
            add_lora(self.transformer, o.lora_rank)

    def _check_parts(self) -> None:
        cfg, te, vq = self.transformer.config, self.text_encoder.config, self.vqvae.config
        problems = []
        if int(vq.num_vq_embeddings) != self.codebook_size:
            problems.append(
                f"vqvae num_vq_embeddings {vq.num_vq_embeddings} != transformer codebook_size {self.codebook_size}"
            )
        if not getattr(vq, "lookup_from_codebook", False):
            problems.append("vqvae config must set lookup_from_codebook = true (decode from token ids)")
        if int(te.hidden_size) != int(cfg.joint_attention_dim):
            problems.append(
                f"text_encoder hidden_size {te.hidden_size} != transformer joint_attention_dim {cfg.joint_attention_dim}"
            )
        if int(te.projection_dim) != int(cfg.pooled_projection_dim):
            problems.append(
                f"text_encoder projection_dim {te.projection_dim} != transformer pooled_projection_dim {cfg.pooled_projection_dim}"
            )
        if problems:
            raise UserError(
                "backbone.options.path: the Meissonic parts do not fit together: " + "; ".join(problems)
            )

    # ------------------------------------------------------------------ building

    @classmethod
    def from_options(cls, options: MeissonicOptions, ctx: BuildContext) -> MeissonicBackbone:
        return cls(*load_components(options, ctx.recipe_dir), options=options)

    @classmethod
    def from_modules(
        cls, transformer, vqvae, text_encoder, tokenizer, options: MeissonicOptions | None = None
    ) -> MeissonicBackbone:
        """Wrap already-built parts (tests, notebooks). ``options`` supplies resolution,
        dtype, LoRA and checkpointing; its ``path`` is ignored."""
        return cls(transformer, vqvae, text_encoder, tokenizer, options=options)

    def export(self, out_dir: str | os.PathLike) -> dict:
        """``mdmrl export``: the four parts this backbone loaded, each with
        ``save_pretrained``, as subfolders of ``out_dir`` (the published repository's
        layout): ``transformer/`` (LoRA adapters merged into the weights, no adapter
        left), ``vqvae/``, ``text_encoder/``, ``tokenizer/``. ``MeissonicTransformer2DModel
        .from_pretrained(out_dir, subfolder="transformer")`` loads the transformer, and
        ``backbone.options.path`` the whole folder; the published repository's other
        files (scheduler, pipeline index) are not written."""
        from pathlib import Path

        from mdmrl.weights import merged_state_dict

        out = Path(out_dir)
        transformer = self.transformer
        if self.options.lora_rank > 0:
            state = merged_state_dict(transformer)
            with torch.device("meta"):
                transformer = type(self.transformer).from_config(self.transformer.config)
            transformer.load_state_dict(state, strict=True, assign=True)
        transformer.save_pretrained(out / "transformer")
        self.vqvae.save_pretrained(out / "vqvae")
        self.text_encoder.save_pretrained(out / "text_encoder")
        self.tokenizer.save_pretrained(str(out / "tokenizer"))
        return {
            "format": "diffusers folder: transformer/, vqvae/, text_encoder/, tokenizer/",
            "load": "MeissonicTransformer2DModel.from_pretrained('DIR', subfolder='transformer') "
            "(mdmrl_plugins.meissonic.transformer); backbone.options.path = 'DIR' with lora_rank = 0",
            "lora_merged": self.options.lora_rank > 0,
            "dtype": self.options.dtype,
            "base": self.options.path,
        }

    def train(self, mode: bool = True) -> MeissonicBackbone:
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
        ids = tok.input_ids.to(self.device)
        out = self.text_encoder(ids, return_dict=True, output_hidden_states=True)
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
        """tokens long [B, N] (row-major grid), cond batch B, timestep float [B] masked
        fraction -> logits float32 [B, N, 8192], features [B, N, D] (up-block output)."""
        b, n = tokens.shape
        h, w = self.grid_shape
        if n != h * w:
            raise ValueError(f"tokens have {n} positions, expected {h * w} for grid {self.grid_shape}")
        if cond.pooled is None:
            raise ValueError("Meissonic needs Conditioning.pooled (CLIP text_embeds)")
        t = pipeline_timestep(timestep.to(self.device), self.options.pipeline_steps)
        out = self.transformer(
            tokens.view(b, h, w),
            encoder_hidden_states=cond.hidden,
            pooled_projections=cond.pooled,
            timestep=t,
            micro_conds=self.micro_conds.expand(b, -1),
        )
        logits = out.logits[:, : self.codebook_size].flatten(2).transpose(1, 2).float()
        features = out.features.flatten(2).transpose(1, 2)
        return BackboneOutput(logits=logits, features=features)

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
