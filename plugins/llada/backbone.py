"""``llada``: the LLaDA masked diffusion language model as an mdmrl :class:`Backbone`.

The network is :class:`~mdmrl_plugins.llada.model.LLaDAModel` (this project's code);
a checkpoint folder in the published layout (``config.json``, sharded safetensors
with ``model.safetensors.index.json``, tokenizer files) loads without running any code
from the folder. The tokenizer and its chat template come through transformers'
``AutoTokenizer``.

Conventions (the text-backbone ones of :mod:`mdmrl_plugins.text.protocol`):

- the completion is the token grid, ``grid_shape = (1, gen_length)``;
- ``encode_prompts``: each prompt becomes the user turn of the tokenizer's chat
  template with the assistant header after it (or the plain prompt with
  ``chat_template = false``), left-truncated and left-padded to ``max_prompt_length``
  tokens; ``Conditioning.hidden`` is its token embeddings ``wte(ids)`` [B, L, D] (so
  a trained ``wte`` gets gradients through the prompt too) and ``attention_mask`` is
  False on padding; the null condition is the empty prompt's;
- ``forward``: the model runs on [prompt; completion] (columns that are padding in
  every row are dropped, padding is never attended) and returns the completion's
  logits over the whole vocabulary, float32 [B, N, V], and its final hidden states
  [B, N, D] as features; the timestep is not used (LLaDA has no timestep input);
- ``decode_text`` / ``decode``: the text before the first end-of-sequence token, as
  strings / drawn as images.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import Backbone, BuildContext, NullConditioningCache
from mdmrl.trajectory import BackboneOutput, Conditioning
from mdmrl_plugins.llada.model import LLaDAConfig, LLaDAModel, load_weights, read_config, weight_files
from mdmrl_plugins.text.pretrain import PretrainOptions
from mdmrl_plugins.text.protocol import first_eos

HUB_ID = "GSAI-ML/LLaDA-8B-Instruct"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: The linear layers of a block, the modules LoRA may adapt.
BLOCK_LINEARS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
WEIGHTS = ("checkpoint", "random")
#: Prompt encodings kept per backbone (least recently used are dropped).
PROMPT_CACHE = 4096
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class LLaDAOptions:
    """Recipe options of the ``llada`` backbone."""

    path: str = field(
        default=HUB_ID,
        metadata={
            "doc": "checkpoint folder (config.json, model.safetensors.index.json + shards or "
            "model.safetensors, tokenizer files; relative paths are resolved against the recipe folder "
            "first) or a Hugging Face hub id (read from the local cache when HF_HUB_OFFLINE is set)"
        },
    )
    weights: str = field(
        default="checkpoint",
        metadata={
            "doc": "checkpoint: the folder's weights; random: a seeded Normal(0, 0.02) init of the "
            "folder's config.json (no weight files needed)",
            "choices": list(WEIGHTS),
        },
    )
    seed: int = field(default=0, metadata={"doc": "seed of the random init (weights = random)", "min": 0})
    dtype: str = field(
        default="bfloat16", metadata={"doc": "dtype of the weights and activations", "choices": list(DTYPES)}
    )
    gen_length: int = field(
        default=256, metadata={"doc": "completion length N: the token grid is 1 x gen_length", "min": 1}
    )
    max_prompt_length: int = field(
        default=256,
        metadata={"doc": "prompt tokens kept (longer prompts lose their start, with a warning)", "min": 1},
    )
    chat_template: bool = field(
        default=True,
        metadata={
            "doc": "wrap each prompt in the tokenizer's chat template as a user turn (Instruct models); "
            "false for a base model"
        },
    )
    stop_tokens: list[str] = field(
        default_factory=lambda: ["<|eot_id|>"],
        metadata={
            "doc": "tokens that end a completion besides config.json's eos_token_id and the tokenizer's "
            "EOS (tokens the tokenizer lacks are skipped)"
        },
    )
    lora_rank: int = field(
        default=0, metadata={"doc": "rank of LoRA adapters (peft); 0 = full fine-tune", "min": 0}
    )
    lora_alpha: float | None = field(
        default=None, metadata={"doc": "LoRA alpha (unset = 2 x lora_rank)", "min_exclusive": 0.0}
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "doc": "LoRA dropout (non-zero makes the forward random in train mode: the on-policy ratio "
            "is then no longer exactly 1)",
            "min": 0.0,
            "max_exclusive": 1.0,
        },
    )
    lora_targets: list[str] = field(
        default_factory=lambda: list(BLOCK_LINEARS),
        metadata={"doc": "block linear layers LoRA adapts", "choices": list(BLOCK_LINEARS)},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"doc": "recompute each block in backward to save activation memory"}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"doc": "accepted for compatibility and never used: no code from the weights folder is run"},
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _missing_weights(reason: str) -> UserError:
    return UserError(
        f"backbone.options.path: LLaDA weights not found ({reason}); download the hub repo {HUB_ID} "
        f"(e.g. `huggingface-cli download {HUB_ID} --local-dir weights/llada-8b-instruct`) "
        "and set backbone.options.path to that folder"
    )


def resolve_folder(path: str, recipe_dir: str = ".") -> Path:
    """The local checkpoint folder for ``path``: an existing folder (relative paths
    are looked up under ``recipe_dir`` first, then the working directory), or the
    hub cache's snapshot of a hub id (downloaded when the hub is reachable; with
    HF_HUB_OFFLINE set, only the cache is read). UserError (the download hint) otherwise."""
    expanded = os.path.expanduser(path)
    candidates = [expanded] if os.path.isabs(expanded) else [os.path.join(recipe_dir, expanded), expanded]
    for cand in candidates:
        if os.path.isdir(cand):
            return Path(cand)
    if not _HUB_ID_RE.fullmatch(path) or path.startswith((".", "~")):
        raise _missing_weights(
            f"folder {path!r} does not exist (looked in {recipe_dir!r} and the working directory)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, local_files_only=_offline()))
    except Exception as exc:  # noqa: BLE001 - hub errors have many classes; all mean "not available"
        offline = ", HF_HUB_OFFLINE set so only the local cache was read" if _offline() else ""
        raise _missing_weights(
            f"hub id {path!r} is not in the local cache ({type(exc).__name__}; no local folder of that name{offline})"
        ) from None


def build_model(
    folder: Path, options: LLaDAOptions, device: torch.device | str = "cpu"
) -> tuple[LLaDAModel, LLaDAConfig]:
    """The network of a checkpoint folder, on ``device`` in the options' dtype: its
    weights (``weights = "checkpoint"``) or a seeded random init of its config.json."""
    if not (folder / "config.json").is_file():
        raise _missing_weights(f"folder {str(folder)!r} has no config.json")
    config = read_config(folder)
    dtype = DTYPES[options.dtype]
    if options.weights == "random":
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(options.seed)
            model = LLaDAModel(config).to(dtype)
            model.reset_parameters()
        return model, config
    files = weight_files(folder)
    if files is None:
        raise _missing_weights(
            f"folder {str(folder)!r} has neither model.safetensors.index.json nor model.safetensors"
        )
    with torch.device("meta"):
        model = LLaDAModel(config)
    load_weights(model, files, device)
    return model.to(dtype), config


def load_tokenizer(folder: Path):
    """``AutoTokenizer.from_pretrained(folder)`` without remote code; UserError naming
    the folder when its tokenizer files are missing or unreadable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"backbone.options.path: no usable tokenizer in {str(folder)!r} ({first})") from None


def add_lora(model: LLaDAModel, rank: int, alpha: float, dropout: float, targets: list[str]) -> None:
    """Freeze the model and add trainable LoRA adapters (peft) to the listed linear
    layers of every block (the vocabulary projection is never adapted)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    pattern = r".*\.blocks\.\d+\.(" + "|".join(re.escape(t) for t in targets) + r")"
    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern), model
    )
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


class LLaDABackbone(Backbone):
    """LLaDA behind the mdmrl Backbone interface (a text backbone; see the module docstring)."""

    name = "llada"
    Options = LLaDAOptions
    #: ``mdmrl pretrain``: the embedded text world's model (:mod:`mdmrl_plugins.text.pretrain`).
    PretrainOptions = PretrainOptions

    def __init__(self, model: LLaDAModel, tokenizer, options: LLaDAOptions | None = None):
        super().__init__()
        o = options or LLaDAOptions()
        self.options = o
        self.model = model.to(DTYPES[o.dtype])
        self.tokenizer = tokenizer
        cfg = model.config
        if o.chat_template and not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "backbone.options.chat_template: the tokenizer has no chat template; "
                "set chat_template = false for a base model"
            )
        self.codebook_size = int(cfg.vocab_rows)
        self.mask_token_id = int(cfg.mask_token_id)
        self.feature_dim = int(cfg.d_model)
        self.grid_shape = (1, int(o.gen_length))
        vocab = tokenizer.get_vocab()
        ids = {int(cfg.eos_token_id)} | {vocab[t] for t in o.stop_tokens if t in vocab}
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(ids))
        self.pad_token_id = int(cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id)
        self._null_cache = NullConditioningCache()
        self._prompt_ids: OrderedDict[str, list[int]] = OrderedDict()
        self._warned_truncation = False
        if o.gradient_checkpointing:
            self.model.gradient_checkpointing = True
        if o.lora_rank > 0:
            alpha = o.lora_alpha if o.lora_alpha is not None else 2.0 * o.lora_rank
            add_lora(self.model, o.lora_rank, alpha, o.lora_dropout, list(o.lora_targets))

    # ------------------------------------------------------------------ building

    @classmethod
    def from_options(cls, options: LLaDAOptions, ctx: BuildContext) -> LLaDABackbone:
        folder = resolve_folder(options.path, ctx.recipe_dir)
        model, _ = build_model(folder, options, ctx.device)
        return cls(model, load_tokenizer(folder), options)

    @classmethod
    def pretrain(cls, options: PretrainOptions, output: str, progress=None) -> dict:
        """Train the embedded arithmetic world's model from scratch and write the
        checkpoint folder ``output``; see :func:`mdmrl_plugins.text.pretrain.pretrain`."""
        from mdmrl_plugins.text.pretrain import pretrain

        return pretrain(options, output, progress)

    def export(self, out_dir: Path) -> dict:
        """``mdmrl export``: a checkpoint folder in LLaDA's published layout (config.json,
        safetensors shards of at most 5 GiB with model.safetensors.index.json, the
        tokenizer files), LoRA adapters merged into the block weights, in the options'
        dtype. ``backbone.options.path`` (and ``weights = "checkpoint"``) reads it back."""
        from mdmrl.weights import merged_state_dict
        from mdmrl_plugins.llada.model import save_checkpoint

        state = merged_state_dict(self.model)
        with torch.device("meta"):
            plain = LLaDAModel(self.model.config)
        plain.load_state_dict(state, strict=True, assign=True)
        save_checkpoint(plain, out_dir)
        self.tokenizer.save_pretrained(str(out_dir))
        return {
            "format": "LLaDA checkpoint folder (config.json, safetensors shards with their index, tokenizer)",
            "load": "backbone.options.path = 'DIR' (lora_rank = 0: adapters are merged)",
            "lora_merged": self.options.lora_rank > 0,
            "dtype": self.options.dtype,
        }

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, prompt: str) -> list[int]:
        """The token ids of one prompt (chat-templated unless ``chat_template = false``),
        its last ``max_prompt_length`` tokens."""
        ids = self._prompt_ids.get(prompt)
        if ids is None:
            if self.options.chat_template:
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            else:
                ids = list(self.tokenizer(prompt)["input_ids"])
            limit = self.options.max_prompt_length
            if len(ids) > limit:
                if not self._warned_truncation:
                    warnings.warn(
                        f"backbone.options.max_prompt_length: a prompt of {len(ids)} tokens keeps its last "
                        f"{limit}",
                        stacklevel=2,
                    )
                    self._warned_truncation = True
                ids = ids[-limit:]
            self._prompt_ids[prompt] = ids
            while len(self._prompt_ids) > PROMPT_CACHE:
                self._prompt_ids.popitem(last=False)
        return ids

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """B prompts -> hidden = wte(ids) [B, L, D] with L = max_prompt_length (left
        padding), attention_mask bool [B, L] (False on padding)."""
        length = self.options.max_prompt_length
        rows = [self.prompt_ids(p) for p in prompts]
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, -len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, -len(r) :] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        return Conditioning(hidden=self.model.embed(ids), attention_mask=mask)

    def null_conditioning(self, batch_size: int) -> Conditioning:
        """The empty prompt's encoding, kept while B, the dtype and ``wte`` stay the
        same (:class:`~mdmrl.interfaces.NullConditioningCache`); do not modify it in place."""
        wte = self.model.transformer.wte.weight
        return self._null_cache.empty_prompts(self, batch_size, [wte], self.options.dtype)

    # ------------------------------------------------------------------ the model

    def forward(self, tokens: torch.Tensor, cond: Conditioning, timestep: torch.Tensor) -> BackboneOutput:
        """tokens long [B, N] (the completion; the mask id where masked), cond batch B
        -> logits float32 [B, N, V], features [B, N, D]. ``timestep`` is not used."""
        b, n = tokens.shape
        prompt_mask = cond.attention_mask
        if prompt_mask is None:
            prompt_mask = torch.ones(cond.hidden.shape[:2], dtype=torch.bool, device=cond.hidden.device)
        used = prompt_mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else prompt_mask.shape[1]  # drop all-padding columns
        x = torch.cat(
            [cond.hidden[:, start:].to(self.model.transformer.wte.weight.dtype), self.model.embed(tokens)], 1
        )
        keys = prompt_mask[:, start:]
        key_mask = None if bool(keys.all()) else torch.cat([keys, keys.new_ones(b, n)], 1)
        hidden = self.model.hidden_states(x, key_mask)[:, -n:]
        return BackboneOutput(logits=self.model.logits(hidden).float(), features=hidden)

    # ------------------------------------------------------------------ outputs

    def decode_text(self, tokens: torch.Tensor) -> list[str]:
        """Completions long [B, N] -> the text before each row's first end-of-sequence
        token, special tokens left out."""
        tokens = tokens.detach().cpu()
        ends = first_eos(tokens, self.eos_token_ids).tolist()
        return [
            self.tokenizer.decode(row[:end].tolist(), skip_special_tokens=True)
            for row, end in zip(tokens, ends)
        ]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Completions long [B, N] -> their text drawn as images float32 [B, 3, 256, 256]."""
        from mdmrl_plugins.text.render import text_images

        return text_images(self.decode_text(tokens))
