"""``shapes-mdm``: the embedded world's small text-to-image masked diffusion model.

A bidirectional transformer over the 16x16 token grid of the shapes world, conditioned
on a prompt and on the masked fraction. Layout of one forward pass (B batch, L text
tokens, N = 256 image tokens, D width, V palette size):

- text: word ids [B, L] -> word + position embedding -> ``text_layers`` transformer
  blocks -> LayerNorm = ``Conditioning.hidden`` [B, L, D] (see :class:`WordTokenizer`);
- image: token ids [B, N] (mask id = V) -> token embedding + learned row/column
  embedding + timestep embedding [B, N, D];
- joint attention: ``layers`` pre-norm blocks over the concatenation [text; image]
  [B, L + N, D], padding text tokens masked out as keys; the MLP of the image tokens
  has a depthwise 3x3 convolution over the grid (locality prior, see :class:`Block`);
- head: final LayerNorm over the image part = ``features`` [B, N, D] -> Linear -> logits
  [B, N, V].

Weights are stored as safetensors with a JSON config beside them (``<stem>.json``);
the committed ones live in ``plugins/shapes/weights/``. See docs/shapes-model.md.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdmrl.errors import UserError
from mdmrl.interfaces import Backbone, BuildContext, NullConditioningCache
from mdmrl.trajectory import BackboneOutput, Conditioning
from mdmrl_plugins.shapes.grammar import canonical

#: The committed weights ("builtin"); the config is the .json file beside it.
BUILTIN_WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes-mdm.safetensors"

PAD, UNK, NULL = "[PAD]", "[UNK]", "[NULL]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, NULL)


# --------------------------------------------------------------------------- config


@dataclass
class ShapesMDMConfig:
    """Everything needed to rebuild the network (stored in the weights' JSON file).

    vocabulary: the prompt words, in id order after the special tokens.
    codebook_size: V, palette size of the world (token 0 = background); mask id = V.
    grid: side of the square token grid (N = grid * grid).
    """

    vocabulary: list[str]
    codebook_size: int
    grid: int = 16
    layers: int = 3
    width: int = 96
    heads: int = 4
    text_layers: int = 1
    text_len: int = 12
    mlp_ratio: int = 4
    patch: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapesMDMConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check(self) -> None:
        """Raise UserError when the numbers cannot build a network."""
        if self.patch < 1 or self.grid % self.patch != 0:
            raise UserError(f"backbone.options: patch {self.patch} must divide the grid side {self.grid}")
        if self.width % self.heads != 0:
            raise UserError(f"backbone.options: width {self.width} must be divisible by heads {self.heads}")


#: The architecture fields shared by the recipe options and :class:`ShapesMDMConfig`.
ARCH_FIELDS: tuple[str, ...] = ("layers", "width", "heads", "text_layers", "text_len", "patch")


def world_config(options: Any) -> ShapesMDMConfig:
    """A config for the shapes world as installed (its vocabulary and palette) with
    the architecture fields (:data:`ARCH_FIELDS`) of ``options``."""
    from mdmrl_plugins.shapes import grammar, world

    cfg = ShapesMDMConfig(
        vocabulary=list(grammar.VOCABULARY),
        codebook_size=int(world.CODEBOOK_SIZE),
        grid=int(world.GRID),
        **{k: getattr(options, k) for k in ARCH_FIELDS},
    )
    cfg.check()
    return cfg


# ------------------------------------------------------------------------ tokenizer


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary.

    A prompt of the shapes grammar is read as its canonical text
    (:func:`.grammar.canonical`: "One blue triangle." and "a blue triangle" encode
    alike), any other text as it is; the text is lower-cased and split on whitespace;
    each word maps to its id, unknown words to [UNK]; the sequence is cut to
    ``length`` words and right-padded with [PAD]. A prompt with no words (the CFG null
    prompt ``""``) encodes to a single [NULL] token followed by padding, so every row
    has at least one real token. Ids: [PAD] = 0, [UNK] = 1, [NULL] = 2, then the
    vocabulary in order.
    """

    def __init__(self, vocabulary: list[str] | tuple[str, ...], length: int):
        words = [w.lower() for w in vocabulary]
        self.itos: list[str] = list(SPECIAL_TOKENS) + [
            w for w in dict.fromkeys(words) if w not in SPECIAL_TOKENS
        ]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.length = length

    @property
    def size(self) -> int:
        return len(self.itos)

    def encode_one(self, prompt: str) -> list[int]:
        words = (canonical(prompt) or prompt).lower().split()
        if not words:
            return [self.stoi[NULL]]
        unk = self.stoi[UNK]
        return [self.stoi.get(w, unk) for w in words[: self.length]]

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts -> (ids long [B, L], attention_mask bool [B, L], True = real token)."""
        ids = torch.full((len(prompts), self.length), self.stoi[PAD], dtype=torch.long)
        for b, p in enumerate(prompts):
            row = self.encode_one(p)
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != self.stoi[PAD]


# ---------------------------------------------------------------------- network


class Block(nn.Module):
    """Pre-norm transformer block: self-attention (``scaled_dot_product_attention``)
    then a GELU MLP. With ``grid`` set, the MLP of the last ``grid * grid`` positions
    (the image tokens) also runs a depthwise 3x3 convolution over the token grid on its
    hidden layer (a "Mix-FFN"), a cheap locality prior that makes a small model learn
    shapes from far fewer samples."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, grid: int | None = None):
        super().__init__()
        self.heads = heads
        self.grid = grid
        hidden = mlp_ratio * width
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if grid else None
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x float [B, S, D] (image tokens last when ``grid`` is set); key_mask bool
        [B, 1, 1, S] (True = may be attended) or None."""
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        h = self.fc1(self.norm2(x))
        if self.conv is not None:
            g = self.grid
            img = h[:, s - g * g :].transpose(1, 2).reshape(b, -1, g, g)  # [B, 4D, g, g]
            local = self.conv(img).flatten(2).transpose(1, 2)  # [B, N, 4D]
            h = torch.cat([h[:, : s - g * g], h[:, s - g * g :] + local], dim=1)
        return x + self.fc2(F.gelu(h))


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the masked fraction t float [B] in [0, 1] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


@dataclass
class ShapesMDMOptions:
    """Recipe options of ``shapes-mdm``.

    ``weights`` picks the parameters. With a weights file ("builtin" or a path) the
    architecture comes from the JSON file beside it and the architecture fields here
    are ignored; they apply only with ``weights = "random"``.
    """

    weights: str = field(
        default="builtin",
        metadata={
            "doc": '"builtin" (the committed pretrained weights), "random" (fresh init with the '
            "architecture fields below), or a path to a .safetensors file written by "
            "`mdmrl pretrain` (its .json config must sit beside it; relative paths are "
            "resolved against the recipe folder first)"
        },
    )
    layers: int = field(
        default=3, metadata={"doc": "joint transformer blocks (random only)", "min": 1, "max": 24}
    )
    width: int = field(default=96, metadata={"doc": "model width D (random only)", "min": 8, "max": 1024})
    heads: int = field(
        default=4, metadata={"doc": "attention heads; divides width (random only)", "min": 1, "max": 32}
    )
    text_layers: int = field(
        default=1, metadata={"doc": "text-encoder blocks (random only)", "min": 0, "max": 8}
    )
    text_len: int = field(
        default=12, metadata={"doc": "text length L in words (random only)", "min": 1, "max": 64}
    )
    patch: int = field(
        default=2,
        metadata={
            "doc": "side of the token patch one transformer position holds (random only)",
            "choices": [1, 2, 4],
        },
    )
    seed: int = field(default=0, metadata={"doc": "seed of the random init (random only)", "min": 0})


@dataclass
class PretrainOptions:
    """Options of ``ShapesMDM.pretrain`` (the ``[pretrain.options]`` table of a
    pretraining recipe). The architecture fields define the network trained."""

    steps: int = field(default=3000, metadata={"doc": "optimizer steps", "min": 1})
    batch_size: int = field(default=32, metadata={"doc": "pairs per step", "min": 1})
    lr: float = field(default=2e-3, metadata={"doc": "peak AdamW learning rate", "min_exclusive": 0.0})
    weight_decay: float = field(default=0.01, metadata={"doc": "AdamW decay of matrices", "min": 0.0})
    warmup: int = field(default=100, metadata={"doc": "linear warm-up steps before cosine decay", "min": 0})
    seed: int = field(default=0, metadata={"doc": "seeds the data rng and the torch init", "min": 0})
    grad_clip: float = field(default=1.0, metadata={"doc": "max global grad norm", "min_exclusive": 0.0})
    null_prompt_prob: float = field(
        default=0.1, metadata={"doc": 'chance a prompt is replaced by "" (CFG)', "min": 0.0, "max": 1.0}
    )
    log_every: int = field(default=10, metadata={"doc": "steps between progress reports", "min": 1})
    threads: int = field(
        default=2, metadata={"doc": "torch CPU threads during training (0 = leave as is)", "min": 0}
    )
    layers: int = field(default=3, metadata={"doc": "joint transformer blocks", "min": 1, "max": 24})
    width: int = field(default=96, metadata={"doc": "model width D", "min": 8, "max": 1024})
    heads: int = field(default=4, metadata={"doc": "attention heads; divides width", "min": 1, "max": 32})
    text_layers: int = field(default=1, metadata={"doc": "text-encoder blocks", "min": 0, "max": 8})
    text_len: int = field(default=12, metadata={"doc": "text length L in words", "min": 1, "max": 64})
    patch: int = field(
        default=2,
        metadata={"doc": "side of the token patch one transformer position holds", "choices": [1, 2, 4]},
    )
    checkpoint_minutes: float = field(
        default=5.0,
        metadata={
            "doc": "minutes between resumable checkpoints (<output>.partial.pt; an interrupted run "
            "started again with the same options continues from it exactly; 0 = none)",
            "min": 0.0,
        },
    )


class ShapesMDM(Backbone):
    """Small bidirectional text-to-image MDM for the shapes world (see module docstring)."""

    name = "shapes-mdm"
    Options = ShapesMDMOptions
    PretrainOptions = PretrainOptions

    def __init__(self, config: ShapesMDMConfig):
        super().__init__()
        config.check()
        self.config = config
        d, g, p = config.width, config.grid, config.patch
        gp = g // p  # side of the patch grid the transformer runs on
        self.codebook_size = config.codebook_size
        self.mask_token_id = config.codebook_size
        self.grid_shape = (g, g)
        self.feature_dim = d
        self.tokenizer = WordTokenizer(config.vocabulary, config.text_len)

        # text encoder
        self.word_emb = nn.Embedding(self.tokenizer.size, d)
        self.text_pos = nn.Parameter(torch.zeros(config.text_len, d))
        self.text_blocks = nn.ModuleList(
            Block(d, config.heads, config.mlp_ratio) for _ in range(config.text_layers)
        )
        self.text_norm = nn.LayerNorm(d)
        #: the null condition, reused while the text tower is unchanged; see :meth:`null_conditioning`
        self._null_cache = NullConditioningCache()
        # image stream
        # one embedding table per position inside a patch: id = sub * (V + 1) + token
        self.tok_emb = nn.Embedding((config.codebook_size + 1) * p * p, d)
        self.row_emb = nn.Parameter(torch.zeros(gp, d))
        self.col_emb = nn.Parameter(torch.zeros(gp, d))
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.pooled_proj = nn.Linear(d, d)
        self.text_type = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(
            Block(d, config.heads, config.mlp_ratio, gp) for _ in range(config.layers)
        )
        self.unpatch = nn.Linear(d, p * p * d) if p > 1 else None
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.codebook_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, zero biases, unit LayerNorm; residual outputs scaled
        by 1/sqrt(2 * blocks) (GPT-2 style). Uses the global torch RNG."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.1)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        n_blocks = max(1, self.config.layers + self.config.text_layers)
        for blk in list(self.blocks) + list(self.text_blocks):
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * n_blocks))
            nn.init.normal_(blk.fc2.weight, std=0.02 / math.sqrt(2 * n_blocks))
        for p in (self.text_pos, self.row_emb, self.col_emb):
            nn.init.normal_(p, std=0.02)
        # word vectors at unit scale (not 0.02): the words of a prompt start distinct, so the
        # image stream can read colours and shapes from the text early in pretraining
        nn.init.normal_(self.word_emb.weight, std=1.0)
        nn.init.zeros_(self.text_type)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_options(cls, options: ShapesMDMOptions, ctx: BuildContext) -> ShapesMDM:
        if options.weights == "random":
            cfg = world_config(options)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(options.seed)
                return cls(cfg)
        if options.weights == "builtin":
            path = BUILTIN_WEIGHTS
        else:
            path = Path(options.weights).expanduser()
            if not path.is_absolute() and (Path(ctx.recipe_dir) / path).exists():
                path = Path(ctx.recipe_dir) / path
        model = cls.load(str(path))
        _check_matches_world(model.config, str(path))
        return model

    @classmethod
    def load(cls, path: str) -> ShapesMDM:
        """Build from ``path`` (.safetensors) and the JSON config beside it.

        Raises UserError naming the file when either is missing or unreadable, or when
        the tensors do not fit the config.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        weights = Path(path)
        cfg_path = config_path(weights)
        if not weights.is_file():
            raise UserError(
                f"backbone.options.weights: {weights} does not exist; give a .safetensors file "
                'written by `mdmrl pretrain`, "builtin" or "random"'
            )
        if not cfg_path.is_file():
            raise UserError(f"backbone.options.weights: config {cfg_path} is missing beside {weights}")
        try:
            meta = json.loads(cfg_path.read_text())
            cfg = ShapesMDMConfig.from_dict(meta["architecture"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"backbone.options.weights: cannot read config {cfg_path}: {exc}") from None
        try:
            state = load_file(str(weights))
        except (OSError, SafetensorError, ValueError) as exc:
            raise UserError(
                f"backbone.options.weights: {weights} is not a readable safetensors file: {exc}"
            ) from None
        model = cls(cfg)
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "mismatch"
            raise UserError(
                f"backbone.options.weights: {weights} does not match {cfg_path}: {first}"
            ) from None
        return model

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Write the parameters to ``path`` (.safetensors, fp32) and the config, plus
        ``extra`` entries, to ``<path minus .safetensors>.json``."""
        from safetensors.torch import save_file

        weights = Path(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(weights), metadata={"format": "pt", "backbone": self.name})
        meta = {"backbone": self.name, "architecture": self.config.to_dict(), "storage": "float32"}
        meta.update(extra or {})
        config_path(weights).write_text(json.dumps(meta, indent=2) + "\n")

    def export(self, out_dir: Path) -> dict[str, Any]:
        """``mdmrl export``: ``shapes-mdm.safetensors`` (every parameter, float32) and
        ``shapes-mdm.json`` (the architecture) in ``out_dir``, the layout of the committed
        weights: :meth:`load` reads it, and so does a recipe with
        ``backbone.options.weights`` set to the .safetensors file."""
        weights = Path(out_dir) / "shapes-mdm.safetensors"
        self.save(str(weights))
        return {
            "format": "shapes-mdm safetensors + JSON config",
            "load": "backbone.options.weights = 'DIR/shapes-mdm.safetensors' "
            "(or ShapesMDM.load('DIR/shapes-mdm.safetensors'))",
        }

    # ------------------------------------------------------------------ interface

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """B prompts -> hidden float [B, L, D], pooled float [B, D] (mean over real
        tokens), attention_mask bool [B, L]."""
        ids, mask = self.tokenizer(list(prompts))
        ids, mask = ids.to(self.device), mask.to(self.device)
        h = self.word_emb(ids) + self.text_pos[None]
        key_mask = mask[:, None, None, :]
        for blk in self.text_blocks:
            h = blk(h, key_mask)
        h = self.text_norm(h)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return Conditioning(hidden=h, pooled=pooled, attention_mask=mask)

    def null_conditioning(self, batch_size: int) -> Conditioning:
        """``encode_prompts([""] * batch_size)``. Without gradients (a rollout, an
        evaluation) it is computed once and reused while the batch size and the text
        tower's weights stay the same (:class:`~mdmrl.interfaces.NullConditioningCache`);
        with gradients on it is computed each time, so a trained text tower gets its
        gradient from the null branch. Callers must not modify the returned tensors in
        place (``Conditioning.cat`` copies them)."""
        tower = itertools.chain(
            self.word_emb.parameters(),
            [self.text_pos],
            self.text_blocks.parameters(),
            self.text_norm.parameters(),
        )
        return self._null_cache.empty_prompts(self, batch_size, tower)

    def forward(self, tokens: torch.Tensor, cond: Conditioning, timestep: torch.Tensor) -> BackboneOutput:
        """tokens long [B, N] (0..V-1 or mask id V); cond from :meth:`encode_prompts`
        (batch B); timestep float [B] = fraction of positions masked.
        Returns logits float32 [B, N, V] and features float [B, N, D]."""
        b, n = tokens.shape
        g, p, d = self.config.grid, self.config.patch, self.config.width
        gp = g // p
        pos = (self.row_emb[:, None, :] + self.col_emb[None, :, :]).reshape(gp * gp, d)
        t = self.time_mlp(timestep_features(timestep.to(self.device), d))  # [B, D]
        if cond.pooled is not None:  # global prompt vector, added to every image position
            t = t + self.pooled_proj(cond.pooled)
        # [B, N] -> [B, M, P*P] (M = gp * gp patches, sub-positions row-major), offset per sub-position
        ids = tokens.view(b, gp, p, gp, p).permute(0, 1, 3, 2, 4).reshape(b, gp * gp, p * p)
        ids = ids + torch.arange(p * p, device=ids.device) * (self.codebook_size + 1)
        x = self.tok_emb(ids).sum(2) + pos[None] + t[:, None, :]  # [B, M, D]
        text = cond.hidden + self.text_type
        seq = torch.cat([text, x], dim=1)  # [B, L + M, D]
        key_mask = None
        if cond.attention_mask is not None:
            keep = torch.cat([cond.attention_mask, cond.attention_mask.new_ones(b, gp * gp)], dim=1)
            key_mask = keep[:, None, None, :]
        for blk in self.blocks:
            seq = blk(seq, key_mask)
        h = seq[:, text.shape[1] :]  # [B, M, D]
        if self.unpatch is not None:  # [B, M, D] -> [B, M, P*P, D] -> [B, N, D] in grid order
            h = self.unpatch(h).view(b, gp, gp, p, p, d).permute(0, 1, 3, 2, 4, 5).reshape(b, n, d)
        feats = self.norm(h)
        return BackboneOutput(logits=self.head(feats).float(), features=feats)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grids long [B, N] -> RGB float32 [B, 3, 8*grid, 8*grid] in [0, 1]."""
        from mdmrl_plugins.shapes import world

        g = self.config.grid
        return world.render_rgb(tokens.reshape(tokens.shape[0], g, g), scale=8)

    # ------------------------------------------------------------------ pretraining

    @classmethod
    def pretrain(cls, options: PretrainOptions, output: str, progress: Any = None) -> dict[str, Any]:
        """Masked-token pretraining on the world's "train" pairs; writes ``output``
        (.safetensors) and its .json config. See :func:`mdmrl_plugins.shapes.pretrain.pretrain`."""
        from mdmrl_plugins.shapes.pretrain import pretrain

        return pretrain(options, output, progress)


def config_path(weights: Path | str) -> Path:
    """``dir/name.safetensors`` -> ``dir/name.json``."""
    p = Path(weights)
    return p.with_suffix(".json") if p.suffix == ".safetensors" else p.with_name(p.name + ".json")


def _check_matches_world(cfg: ShapesMDMConfig, path: str) -> None:
    from mdmrl_plugins.shapes import grammar, world

    if int(world.CODEBOOK_SIZE) != cfg.codebook_size or int(world.GRID) != cfg.grid:
        raise UserError(
            f"backbone.options.weights: {path} was trained for a {cfg.grid}x{cfg.grid} grid with "
            f"{cfg.codebook_size} colours but the world has {world.GRID}x{world.GRID} and "
            f"{world.CODEBOOK_SIZE}; re-run `mdmrl pretrain recipes/shapes/pretrain.toml`"
        )
    missing = sorted({w.lower() for w in grammar.VOCABULARY} - {w.lower() for w in cfg.vocabulary})
    if missing:
        raise UserError(
            f"backbone.options.weights: {path} lacks prompt words {', '.join(missing[:5])}; "
            "re-run `mdmrl pretrain recipes/shapes/pretrain.toml`"
        )
