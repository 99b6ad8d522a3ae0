"""Per-GPU memory plan of one RL training iteration for large backbones, from
parameter and activation counts measured on the ``meta`` device, and a check of the
formula against measured peaks of small models.

What is measured (no weights are allocated for the large models):

- parameter counts of the real architectures built on ``torch.device("meta")``: the
  Meissonic transformer of ``plugins/meissonic`` with the published config, its
  CLIP-ViT-H-14 text tower and aMUSEd VQ model; LoRA adapters added by the backbone's
  own ``add_lora``;
- activation memory of one loss term (the replay of one denoising step of ``b``
  trajectories, classifier-free guidance doubling the rows, the Co-GRPO log-prob head)
  forward + backward, with and without gradient checkpointing: the peak of live tensor
  bytes counted by :class:`LiveBytes`, a ``TorchDispatchMode`` that registers every
  storage an operator creates and drops it when the storage is freed (a weak reference
  on the storage), gradients allocated beforehand; measured at b = 1 and b = 2, so
  memory = fixed + per_trajectory x b;
- the working set of an inference forward (a sampler call), the same way, without
  gradients, and of the VQ decoder.

The formula (:func:`plan`) adds weights, gradients and AdamW states at the bytes per
parameter of bf16 mixed precision, divided by the sharding degree as each engine
shards them (DDP: none; FSDP full shard and DeepSpeed ZeRO-3: all three), the
engines' transient buffers, activations x micro-batch, and the rollout. docs/scaling.md
writes it out and prints the tables this script produces.

The check (:func:`check_step`) runs real training steps of small models (the shapes
MDM, a small Meissonic config) on the CPU, counts the peak of live tensor bytes of the
whole step (forward, backward, AdamW step) and of a whole rollout (the ``confidence``
sampler), and divides the formula's prediction by it. With ``--device cuda`` it also
runs the steps of the large models with random weights on the GPU and compares
``torch.cuda.max_memory_allocated`` with the formula.

    python benchmarks/memory_plan.py                  # tables and the CPU check
    python benchmarks/memory_plan.py --json /tmp/plan.json
    python benchmarks/memory_plan.py --device cuda    # also the GPU check of the large models
    python benchmarks/memory_plan.py --quick          # smoke run: small configs only
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import common
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30
ENGINES = ("ddp", "fsdp", "zero3")
ENGINE_LABELS = {"ddp": "DDP", "fsdp": "FSDP full shard", "zero3": "ZeRO-3"}
GPU_COUNTS = (1, 8, 16)
#: The models the plan is for; the others are small configs for the checks.
PLANNED = ("meissonic-1b", "llada-8b")
#: How close the formula must come to a measured peak: predicted / measured in this range.
CHECK_RANGE = (0.9, 1.1)


# --------------------------------------------------------------------------- measuring


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created while the mode is active and still alive.

    Every operator's outputs are inspected; a storage seen for the first time that is
    not one of the operator's inputs' storages (a view or an in-place result) is new:
    its size is added and a weak reference on it subtracts the size when the storage is
    freed (torch keeps a storage's Python object alive as long as the storage lives).
    ``peak`` is the maximum of ``live`` after every operator. Works on every device,
    ``meta`` included. Storages created before the mode (parameters, inputs) are not
    counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        for t in tree_flatten(out)[0]:
            if not torch.is_tensor(t):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._refs or key in inputs:
                continue
            nbytes = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _r, k=key, n=nbytes: self._freed(k, n))
            self.live += nbytes
        self.peak = max(self.peak, self.live)
        return out


@contextmanager
def on_meta() -> Iterator[None]:
    """Run the real models' code on meta tensors as it runs on a GPU.

    Attention: on the meta device torch decomposes attention into the math path, which stores the
    [B, heads, S, S] attention matrix for backward; the fused kernels used on the GPU
    (flash, memory-efficient) and on the CPU keep only the output and the log-sum-exp.
    Inside this context meta inputs go to ``_scaled_dot_product_flash_attention_for_cpu``,
    whose meta function allocates what those kernels allocate.

    Autocast: ``torch.autocast("meta", ...)`` is refused; code that switches autocast
    off around its float32 parts (LLaDA's RMSNorm and rotary embeddings) gets a context
    that does nothing for meta tensors, which is what switching it off does.

    Other devices are unchanged."""
    real = F.scaled_dot_product_attention
    real_autocast = torch.autocast

    def autocast(device_type: str, *args, **kwargs):
        if device_type == "meta":
            return nullcontext()
        return real_autocast(device_type, *args, **kwargs)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta":
            return real(
                query,
                key,
                value,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return op(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    torch.autocast = autocast
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real
        torch.autocast = real_autocast


#: Batches at which activations are measured: a line through b = 1, 2 and one through
#: b = 8, 16 (see :class:`Fit`).
TRAIN_BATCHES = (1, 2, 8, 16)


@dataclass
class Fit:
    """Bytes as a function of the batch b: the largest of straight lines, each through
    two measurements, ``lines`` = [(fixed, per_item), ...].

    One line (b = 1, 2) describes a working set that grows with the batch. Training
    steps get two (b = 1, 2 and b = 8, 16): at small b the peak can be set by a term of
    fixed size (LLaDA's parameter-sized gradients of the 126k-row embedding and output
    layer, made before they are added to the stored gradients), at large b by the
    activations; the larger of the two lines is the peak at every b, provided the
    activations dominate from b = 8 on."""

    lines: list[tuple[float, float]]

    @classmethod
    def through(cls, points: dict[int, float]) -> Fit:
        """Lines through consecutive pairs of ``points`` (batch -> bytes), in batch order."""
        bs = sorted(points)
        pairs = zip(bs[0::2], bs[1::2])
        lines = []
        for lo, hi in pairs:
            slope = (points[hi] - points[lo]) / (hi - lo)
            lines.append((points[lo] - slope * lo, slope))
        return cls(lines)

    @property
    def per_item(self) -> float:
        """Bytes per extra trajectory at large b (the slope of the last line)."""
        return self.lines[-1][1]

    def __call__(self, b: float) -> float:
        return max(fixed + per * b for fixed, per in self.lines)


# --------------------------------------------------------------------------- models


@dataclass
class Variant:
    """How a backbone is built for one measurement."""

    device: str = "meta"
    dtype: torch.dtype = torch.bfloat16
    lora: bool = False
    checkpointing: bool = False


@dataclass
class Spec:
    """A backbone whose memory is planned or checked, and the run it is planned for.

    build(variant) -> (mdmrl Backbone, trained network): the network holding the
    trained parameters (the Meissonic transformer; the whole shapes MDM). shallow: the
    same model with one block of each kind, on which the sampler's own buffers are
    measured on the CPU (they depend on tokens, codebook, width and guidance, not on
    the depth).
    batch / group / steps: trajectories per iteration, G, T. cfg: the replayed steps
    are guided (batch 2B forwards). lora_rank / lora_targets: the LoRA variant.
    prompts(n): prompts the backbone can encode. checkpointing: the backbone supports
    gradient checkpointing. dtype: the compute dtype the activations are measured in.
    decode_chunk: images per decoder call when rewards decode the tokens (0: not
    measured); decode_device: where the decoder's working set is measured (meta, or
    cpu for a decoder that cannot run on meta tensors)."""

    name: str
    label: str
    build: Callable[[Variant], tuple[Any, torch.nn.Module]]
    shallow: Callable[[Variant], tuple[Any, torch.nn.Module]]
    prompts: Callable[[int], list[str]]
    batch: int
    group: int
    steps: int
    cfg: bool
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    checkpointing: bool = True
    dtype: torch.dtype = torch.bfloat16
    decode_chunk: int = 0
    decode_device: str = "meta"
    units: tuple[str, ...] = ()
    host_mask: bool = False
    notes: str = ""


@dataclass(frozen=True)
class MeissonicSize:
    """The parts of a Meissonic backbone: transformer config, image side, CLIP text
    tower and VQ model configs."""

    transformer: dict
    resolution: int
    text: dict
    vq: dict


def clip_text(width: int, layers: int, heads: int, mlp: int, **extra: Any) -> dict:
    """``CLIPTextConfig`` fields of a CLIP text tower: the CLIP vocabulary (49408 ids,
    77 positions), a projection as wide as the tower."""
    return dict(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def meissonic_1b() -> MeissonicSize:
    """The published Meissonic: transformer config of ``MeissonFlow/Meissonic``
    (``plugins/meissonic/structure.py``), CLIP-ViT-H-14's text tower (width 1024, 24
    layers, 16 heads, MLP 4096, projection 1024), and the aMUSEd VQ-GAN (diffusers'
    aMUSEd conversion: channels 128-256-256-512-768, 16x downsampling, 64 latent
    channels, 8192 codes), whose 64x64 token grid at 1024x1024 is Meissonic's."""
    from mdmrl_plugins.meissonic.structure import PUBLISHED_CONFIG

    return MeissonicSize(
        transformer=dict(PUBLISHED_CONFIG),
        resolution=1024,
        text=clip_text(width=1024, layers=24, heads=16, mlp=4096, hidden_act="gelu"),
        vq=dict(
            act_fn="silu",
            block_out_channels=(128, 256, 256, 512, 768),
            down_block_types=("DownEncoderBlock2D",) * 5,
            up_block_types=("UpDecoderBlock2D",) * 5,
            in_channels=3,
            out_channels=3,
            latent_channels=64,
            layers_per_block=2,
            norm_num_groups=32,
            num_vq_embeddings=8192,
            sample_size=32,
            mid_block_add_attention=False,
            lookup_from_codebook=True,
        ),
    )


def meissonic_small(
    width: int = 128, layers: int = 2, grid: int = 32, codebook: int = 1024, heads: int = 2
) -> MeissonicSize:
    """A small Meissonic of the same architecture: ``width`` (``heads`` heads),
    ``layers`` dual- and ``layers`` single-stream blocks, a ``grid`` x ``grid`` token
    grid (half that inside the transformer), ``codebook`` codes, a 2-layer CLIP text
    tower of the same width and a 2-level VQ model."""
    head = width // heads
    side = (head // 3) // 2 * 2
    axes = [head - 2 * side, side, side]
    return MeissonicSize(
        transformer=dict(
            num_layers=layers,
            num_single_layers=layers,
            attention_head_dim=head,
            num_attention_heads=heads,
            joint_attention_dim=width,
            pooled_projection_dim=width,
            axes_dims_rope=axes,
            vocab_size=codebook + 64,
            codebook_size=codebook,
        ),
        resolution=2 * grid,
        text=clip_text(width=width, layers=2, heads=2, mlp=2 * width),
        vq=dict(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 16),
            layers_per_block=1,
            latent_channels=4,
            num_vq_embeddings=codebook,
            norm_num_groups=4,
            vq_embed_dim=4,
            mid_block_add_attention=False,
            lookup_from_codebook=True,
        ),
    )


def replace_layers(size: MeissonicSize, layers: int) -> MeissonicSize:
    """``size`` with ``layers`` dual- and ``layers`` single-stream blocks."""
    return replace(size, transformer={**size.transformer, "num_layers": layers, "num_single_layers": layers})


def build_meissonic(size: MeissonicSize, rank: int) -> Callable[[Variant], tuple[Any, torch.nn.Module]]:
    def build(v: Variant):
        from diffusers import VQModel
        from diffusers.utils import logging as dlog
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        from mdmrl_plugins.meissonic.backbone import MeissonicBackbone, MeissonicOptions
        from mdmrl_plugins.meissonic.transformer import MeissonicTransformer2DModel

        dlog.set_verbosity_error()  # the fp32 -> bf16 cast warning of ModelMixin.to
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[v.dtype]
        options = MeissonicOptions(
            resolution=size.resolution,
            dtype=dtype,
            lora_rank=rank if v.lora else 0,
            gradient_checkpointing=v.checkpointing,
        )
        with torch.device(v.device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformer = MeissonicTransformer2DModel(**size.transformer)
            vq = VQModel(**size.vq)
            text = CLIPTextModelWithProjection(CLIPTextConfig(**size.text))
            backbone = MeissonicBackbone.from_modules(
                transformer, vq, text, common.clip_tokenizer(), options=options
            )
        return backbone, backbone.transformer

    return build


def build_shapes(
    quick: bool = False, layers: int | None = None
) -> Callable[[Variant], tuple[Any, torch.nn.Module]]:
    """The shapes MDM with the committed weights' architecture (random weights; with
    ``layers`` image blocks instead of its own); the text tower trains with the rest,
    so the trained network is the whole backbone."""

    def build(v: Variant):
        from mdmrl_plugins.shapes.model import ShapesMDM

        if v.lora:
            raise ValueError("shapes-mdm has no LoRA variant")
        cfg = common.shapes_backbone(torch.device("cpu"), quick=quick).config
        if layers is not None:
            cfg = replace(cfg, layers=layers)
        with torch.device(v.device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            backbone = ShapesMDM(cfg).to(v.dtype)
        return backbone, backbone

    return build


#: LLaDA-8B's run: G = 8, completions of N = 256 tokens, prompts of P = 128 tokens (a
#: GSM8K question is some 60-80 tokens; the chat template and an answer-format
#: instruction bring it to about 128), T = 128 steps (2 tokens revealed per step).
LLADA_GEN, LLADA_PROMPT, LLADA_STEPS = 256, 128, 128

#: A GSM8K-style problem, repeated so that every prompt has at least P tokens (the
#: backbone keeps the last P): the prompt then fills its columns, as a batch of long
#: prompts does.
TEXT_PROMPT = (
    "A baker makes 48 rolls in the morning and half as many in the afternoon. She sells 3/4 of "
    "all the rolls. How many rolls are left? Think step by step and give the final answer in a box. "
)


def text_prompts(n: int) -> list[str]:
    return [f"Problem {i}: " + TEXT_PROMPT * 12 for i in range(n)]


def build_llada(
    config: Any, prompt: int, gen: int, rank: int
) -> Callable[[Variant], tuple[Any, torch.nn.Module]]:
    """The project's ``llada`` backbone around :class:`LLaDAModel` of ``config``
    (random weights), with the small byte-level tokenizer of ``plugins/llada/tiny.py``
    (token ids only reach the embedding; the vocabulary size is the config's)."""

    def build(v: Variant):
        from mdmrl_plugins.llada.backbone import LLaDABackbone, LLaDAOptions
        from mdmrl_plugins.llada.model import LLaDAModel

        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[v.dtype]
        options = LLaDAOptions(
            weights="random",
            dtype=dtype,
            gen_length=gen,
            max_prompt_length=prompt,
            lora_rank=rank if v.lora else 0,
            gradient_checkpointing=v.checkpointing,
        )
        with torch.device(v.device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LLaDAModel(config)
            if v.device != "meta":
                model.reset_parameters()
        backbone = LLaDABackbone(model, _text_tokenizer(), options)
        return backbone, backbone.model

    return build


_TOKENIZERS: list[Any] = []


def _text_tokenizer():
    """The byte-level tokenizer of ``plugins/llada/tiny.py``, built once."""
    if not _TOKENIZERS:
        from mdmrl_plugins.llada.tiny import byte_level_tokenizer

        _TOKENIZERS.append(byte_level_tokenizer())
    return _TOKENIZERS[0]


def llada_specs(quick: bool) -> dict[str, Spec]:
    """LLaDA-8B (not with ``quick``) and a small LLaDA for the CPU check; none when the
    ``llada`` backbone is not installed."""
    import importlib.util

    if importlib.util.find_spec("mdmrl_plugins.llada.backbone") is None:
        return {}
    from mdmrl_plugins.llada.backbone import BLOCK_LINEARS
    from mdmrl_plugins.llada.model import LLaDAConfig

    out: dict[str, Spec] = {}
    common_fields = dict(prompts=text_prompts, cfg=False, units=("LLaDABlock",), host_mask=True)
    if not quick:
        out["llada-8b"] = Spec(
            name="llada-8b",
            label=f"LLaDA-8B, prompt {LLADA_PROMPT} + completion {LLADA_GEN} tokens",
            build=build_llada(LLaDAConfig(), LLADA_PROMPT, LLADA_GEN, 128),
            # sampler buffers: same tokens and vocabulary, width 256 (they are the [B, N, V] logits)
            shallow=build_llada(
                LLaDAConfig(d_model=256, n_heads=4, n_kv_heads=4, n_layers=1, mlp_hidden_size=512),
                LLADA_PROMPT,
                LLADA_GEN,
                128,
            ),
            batch=64,
            group=8,
            steps=LLADA_STEPS,
            lora_rank=128,
            lora_targets=BLOCK_LINEARS,
            notes="8 prompts x G = 8 per iteration, T = 128, no guidance",
            **common_fields,
        )
    small = LLaDAConfig(
        d_model=32 if quick else 64,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        mlp_hidden_size=64 if quick else 128,
        vocab_size=384,
        embedding_size=384,
        max_sequence_length=1024,
        rope_theta=10000.0,
        mask_token_id=2,
        eos_token_id=1,
        pad_token_id=1,
    )
    out["llada-small"] = Spec(
        name="llada-small",
        label="LLaDA, small config (CPU check)",
        build=build_llada(small, 16, 32, 4),
        shallow=build_llada(replace(small, n_layers=1), 16, 32, 4),
        batch=8,
        group=4,
        steps=8,
        lora_rank=4,
        lora_targets=BLOCK_LINEARS,
        **common_fields,
    )
    return out


def specs(quick: bool) -> dict[str, Spec]:
    """The planned large models (not with ``quick``) and the small checked ones."""
    from mdmrl_plugins.meissonic.backbone import DECODE_CHUNK, LORA_TARGETS

    out: dict[str, Spec] = {}
    if not quick:
        out["meissonic-1b"] = Spec(
            name="meissonic-1b",
            label="Meissonic-1B, 1024x1024 (64x64 tokens)",
            build=build_meissonic(meissonic_1b(), 32),
            shallow=build_meissonic(replace_layers(meissonic_1b(), 1), 32),
            prompts=common.amused_prompts,
            batch=96,
            group=6,
            steps=48,
            cfg=True,
            lora_rank=32,
            lora_targets=LORA_TARGETS,
            decode_chunk=DECODE_CHUNK,
            notes="the Co-GRPO paper's Meissonic run: 96 images per iteration, G = 6, T = 48, guided replays",
        )
    small = dict(width=32, layers=1, grid=16, codebook=256) if quick else {}
    out["meissonic-small"] = Spec(
        name="meissonic-small",
        label="Meissonic, small config (CPU check)",
        build=build_meissonic(meissonic_small(**small), 4),
        shallow=build_meissonic(replace_layers(meissonic_small(**small), 1), 4),
        prompts=common.amused_prompts,
        batch=8,
        group=4,
        steps=4 if quick else 8,
        cfg=True,
        lora_rank=4,
        lora_targets=LORA_TARGETS,
        decode_chunk=DECODE_CHUNK,
    )
    out["shapes-mdm"] = Spec(
        name="shapes-mdm",
        label="shapes-mdm (CPU check)",
        build=build_shapes(quick),
        shallow=build_shapes(quick, layers=1),
        prompts=common.shapes_prompts,
        batch=32,
        group=8,
        steps=4 if quick else 8,
        cfg=False,
        checkpointing=False,
        dtype=torch.float32,
        decode_chunk=4,
        decode_device="cpu",
        units=("Block",),
    )
    out.update(llada_specs(quick))
    return out


# --------------------------------------------------------------------------- one loss term


@contextmanager
def long_prompts() -> Iterator[None]:
    """Text prompts are longer than the backbone keeps on purpose (they then fill every
    prompt position): no warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="backbone.options.max_prompt_length")
        yield


def conditions(backbone, spec: Spec, b: int):
    """(cond, pair) of ``b`` prompts: the backbone's encoding, and ``[uncond; cond]``
    with guidance (None without). With ``spec.host_mask`` the prompt mask is all True,
    on the host."""
    from mdmrl.trajectory import Conditioning

    with long_prompts():
        cond = backbone.encode_prompts(spec.prompts(b))
    if spec.host_mask:
        cond = Conditioning(cond.hidden, cond.pooled, torch.ones(cond.hidden.shape[:2], dtype=torch.bool))
    pair = Conditioning.cat([backbone.null_conditioning(b), cond]) if spec.cfg else None
    return cond, pair


def replay_loss(backbone, spec: Spec, b: int) -> torch.Tensor:
    """The model loss of one replayed step of ``b`` trajectories, as the Co-GRPO
    objective computes it through the ``confidence`` sampler: prompts encoded (with
    gradients where the backbone's text tower trains), one ``cfg_forward`` of 2b rows
    (b without guidance), the guided, tempered rows of the positions revealed at the
    step (N / T of them; every position for codebooks of at most DENSE_MAX_CODEBOOK,
    as ``step_log_prob`` does), their log-softmax at the revealed tokens, summed, times
    the advantages. The revealed positions are fixed here (``step_log_prob`` finds them
    with ``nonzero``, which cannot run on meta tensors)."""
    from mdmrl_plugins.cogrpo.sampler import DENSE_MAX_CODEBOOK, cfg_forward, guided_rows, sum_filled

    device = backbone.device
    n, v = backbone.num_tokens, backbone.codebook_size
    cond, pair = conditions(backbone, spec, b)
    tokens = torch.full((b, n), backbone.mask_token_id, dtype=torch.long, device=device)
    timestep = torch.full((b,), 0.5, device=device)
    c, u, _ = cfg_forward(backbone, tokens, cond, pair, timestep)
    actions = torch.tensor([[1.0, 0.5, 1.0, 3.0 if spec.cfg else 1.0]] * b, device=device)
    if v <= DENSE_MAX_CODEBOOK:
        z = guided_rows(c, u, actions, None, unit_temperature=False)  # [b n, V]
        picked = z.log_softmax(-1).gather(-1, torch.zeros(b * n, 1, dtype=torch.long, device=device))
        filled = torch.ones(b, n, dtype=torch.bool, device=device)
        log_prob = sum_filled(picked.view(b, n), filled)
    else:
        revealed = math.ceil(n / spec.steps)
        index = (
            torch.arange(b, device=device)[:, None] * n + torch.arange(revealed, device=device)
        ).flatten()
        z = guided_rows(c, u, actions, index, unit_temperature=False)  # [b revealed, V]
        picked = z.log_softmax(-1).gather(-1, torch.zeros(len(index), 1, dtype=torch.long, device=device))
        log_prob = picked.view(b, revealed).sum(-1)
    return -(log_prob * torch.ones(b, device=device)).mean()


def rollout_forward(backbone, spec: Spec, b: int) -> None:
    """One sampler forward of ``b`` trajectories without gradients (2b rows with CFG)."""
    from mdmrl_plugins.cogrpo.sampler import cfg_forward

    with torch.no_grad():
        cond, pair = conditions(backbone, spec, b)
        tokens = torch.full((b, backbone.num_tokens), backbone.mask_token_id, device=backbone.device)
        cfg_forward(backbone, tokens, cond, pair, torch.full((b,), 0.5, device=backbone.device))


# --------------------------------------------------------------------------- counts


@dataclass
class Counts:
    """What the formula needs of a model, measured on the meta device.

    trained: parameters of the trained network (with LoRA: its frozen base); adapters:
    LoRA parameters; frozen_bytes: other frozen modules (text encoder, VQ) as stored;
    unit: parameters of the network's largest block (what FSDP / ZeRO-3 gather at
    once); largest_tensor: the largest trained parameter tensor (full fine-tune);
    train / train_lora: activation bytes of one loss term, a Fit in the trajectories
    b, keyed "plain" / "checkpointing"; infer: working set of one sampler forward in b;
    sampler: the sampler's own buffers beyond it, in b; decode: working set of one
    decoder call, in the images (at most ``decode_chunk`` per call); tokens: N;
    codebook: V; trajectory_bytes: the stored record of one trajectory (T steps);
    batch: trajectories per iteration; cfg: guided replays; dtype_bytes: bytes per
    element of the dtype the activations were measured in; held_after_forward: bytes
    alive at the end of the forward of one trajectory, per variant (recorded for
    reading, not used by the formula)."""

    trained: int
    adapters: int
    frozen_bytes: int
    unit: int
    largest_tensor: int
    train: dict[str, Fit]
    train_lora: dict[str, Fit]
    infer: Fit
    sampler: Fit
    decode: Fit
    decode_chunk: int
    tokens: int
    codebook: int
    trajectory_bytes: int
    batch: int
    cfg: bool
    dtype_bytes: int = 2
    held_after_forward: dict[str, float] = field(default_factory=dict)


def trajectory_bytes(n: int, steps: int, k: int = 4) -> int:
    """Bytes of one trajectory of mdmrl.trajectory.Trajectory's documented layout: tokens
    long [T+1, N], filled bool [T, N], actions and raw_actions float32 [T, K], two
    float32 log-prob rows [T], seed and group id (long)."""
    return 8 * (steps + 1) * n + steps * n + 2 * 4 * steps * k + 2 * 4 * steps + 2 * 8


def _units(network: torch.nn.Module, names: tuple[str, ...] = ()) -> list[torch.nn.Module]:
    """The blocks FSDP would wrap: modules of the classes ``names``, by default the
    network's ``_no_split_modules`` (diffusers models)."""
    names = set(names or getattr(network, "_no_split_modules", None) or ())
    return [m for m in network.modules() if type(m).__name__ in names]


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def measure_train(
    spec: Spec, variant: Variant, batches: tuple[int, ...] = TRAIN_BATCHES
) -> tuple[Fit, float]:
    """Activation bytes of one loss term at b in ``batches`` (gradients
    allocated beforehand, as from the second micro-batch of an optimizer step on, so
    only activations and temporaries count), and the bytes held at the end of the
    forward at b = 1 (what backward will read, plus the loss)."""
    backbone, _ = spec.build(variant)
    backbone.train()
    for p in backbone.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    values, held = {}, 0.0
    for b in batches:
        with on_meta(), LiveBytes() as live:
            loss = replay_loss(backbone, spec, b)
            if b == 1:
                held = live.live
            loss.backward()
            del loss
        values[b] = live.peak
    return Fit.through(values), held


def fit_peaks(run: Callable[[int], float | None], batches: tuple[int, ...] = (1, 2)) -> Fit:
    """The :class:`Fit` of the peak live bytes of ``run(b)`` at each of ``batches``,
    less the bytes ``run`` returns (what it keeps that is counted elsewhere)."""
    values = {}
    for b in batches:
        with LiveBytes() as live:
            kept = run(b)
        values[b] = live.peak - (kept or 0)
    return Fit.through(values)


def measure_infer(spec: Spec, variant: Variant) -> Fit:
    """Working set of one sampler forward (no gradients), on the meta device."""
    backbone, _ = spec.build(variant)
    backbone.eval()
    with on_meta():
        return fit_peaks(lambda b: rollout_forward(backbone, spec, b))


def sample(backbone, spec: Spec, b: int, steps: int | None = None):
    """A rollout of ``b`` trajectories by the ``confidence`` sampler under Meissonic's
    schedule (guidance scale 3 when the spec replays guided steps, else 1)."""
    from mdmrl_plugins.cogrpo.sampler import ConfidenceSampler
    from mdmrl_plugins.cogrpo.schedules import MeissonicOptions, MeissonicSchedule

    schedule = MeissonicSchedule(MeissonicOptions(cfg_scale=3.0 if spec.cfg else 1.0))
    with long_prompts():
        return ConfidenceSampler().sample(
            backbone, schedule, spec.prompts(b), steps or spec.steps, torch.arange(b)
        )


def stored_bytes(traj) -> int:
    """Bytes of the tensors a Trajectory holds."""
    fields = (traj.tokens, traj.filled, traj.actions, traj.raw_actions, traj.model_log_probs)
    return _storage_bytes([*fields, traj.schedule_log_probs, traj.seeds, traj.group_ids])


def measure_sampler(spec: Spec) -> Fit:
    """The sampler's own buffers beyond the forward's working set and the trajectory it
    returns, per call of b trajectories: measured on the CPU on the spec's shallow
    model over two steps."""
    backbone, _ = spec.shallow(Variant(device="cpu", dtype=torch.float32))
    backbone.eval()
    with torch.no_grad():
        forward = fit_peaks(lambda b: rollout_forward(backbone, spec, b))
        rollout = fit_peaks(lambda b: stored_bytes(sample(backbone, spec, b, steps=2)))
    return Fit([(r0 - f0, r1 - f1) for (r0, r1), (f0, f1) in zip(rollout.lines, forward.lines)])


def measure_decode(spec: Spec) -> Fit:
    """Working set of one ``decode`` call (no gradients), on the spec's shallow model
    (the decoder is the same) built on ``spec.decode_device``."""
    backbone, _ = spec.shallow(Variant(device=spec.decode_device, dtype=spec.dtype))

    def decode(b: int) -> None:
        backbone.decode(torch.zeros(b, backbone.num_tokens, dtype=torch.long, device=backbone.device))

    with torch.no_grad(), on_meta():
        return fit_peaks(decode)


def count(spec: Spec, dtype: torch.dtype | None = None, batches: tuple[int, ...] = TRAIN_BATCHES) -> Counts:
    """Measure everything :func:`plan` needs for ``spec`` on the meta device, with the
    backbone's weights in ``dtype`` (default: the spec's compute dtype); activations at
    the trajectory counts ``batches``."""
    dtype = dtype or spec.dtype
    base = Variant(dtype=dtype)
    backbone, network = spec.build(base)
    trained = _numel(network.parameters())
    trained_ids = {id(p) for p in network.parameters()}
    frozen_bytes = sum(
        p.numel() * p.element_size() for p in backbone.parameters() if id(p) not in trained_ids
    )
    unit = max((_numel(m.parameters()) for m in _units(network, spec.units)), default=trained)
    largest = max(p.numel() for p in network.parameters())
    decode = measure_decode(spec) if spec.decode_chunk else Fit([(0.0, 0.0)])
    n, v = backbone.num_tokens, backbone.codebook_size
    adapters = 0
    train_lora: dict[str, Fit] = {}
    train: dict[str, Fit] = {}
    held: dict[str, float] = {}
    for ckpt in (False, True) if spec.checkpointing else (False,):
        key = "checkpointing" if ckpt else "plain"
        train[key], held[key] = measure_train(spec, replace(base, checkpointing=ckpt), batches)
        if spec.lora_rank:
            lora = replace(base, lora=True, checkpointing=ckpt)
            train_lora[key], held[f"lora_{key}"] = measure_train(spec, lora, batches)
    if spec.lora_rank:
        lora_backbone, _ = spec.build(replace(base, lora=True))
        adapters = _numel(p for p in lora_backbone.parameters() if p.requires_grad)
    return Counts(
        trained=trained,
        adapters=adapters,
        frozen_bytes=frozen_bytes,
        unit=unit,
        largest_tensor=largest,
        train=train,
        train_lora=train_lora,
        infer=measure_infer(spec, base),
        sampler=measure_sampler(spec),
        decode=decode,
        decode_chunk=spec.decode_chunk,
        tokens=n,
        codebook=v,
        trajectory_bytes=trajectory_bytes(n, spec.steps),
        batch=spec.batch,
        cfg=spec.cfg,
        dtype_bytes=torch.finfo(dtype).bits // 8,
        held_after_forward=held,
    )


# --------------------------------------------------------------------------- the formula


@dataclass(frozen=True)
class Setup:
    """One configuration of the plan.

    engine: "ddp", "fsdp" (full shard) or "zero3"; gpus: data-parallel processes, also
    the sharding degree of FSDP and ZeRO-3; lora / checkpointing: which activation
    measurement and which parameters train; micro_batch: trajectories per backward;
    term_chunk: loss terms (steps) back-propagated together; rollout_batch:
    trajectories per sampler call; precision: "bf16-mixed" (fp32 master weights, bf16
    compute: autocast under DDP, bf16 parameters inside FSDP / ZeRO-3) or "fp32";
    foreach: AdamW's multi-tensor step (torch's default on CUDA), which holds one fp32
    buffer the size of the parameters it updates; reference: the frozen copy of the
    backbone the engine keeps for the KL monitor / penalty."""

    engine: str = "ddp"
    gpus: int = 1
    lora: bool = False
    checkpointing: bool = False
    micro_batch: int = 1
    term_chunk: int = 1
    rollout_batch: int = 4
    precision: str = "bf16-mixed"
    foreach: bool = True
    reference: bool = False


#: bytes per trained parameter (weights, gradients, AdamW moments incl. fp32 master copy)
STATE_BYTES = {
    ("ddp", "bf16-mixed"): (4, 4, 8),  # fp32 weights and grads (autocast), fp32 moments
    ("fsdp", "bf16-mixed"): (4, 4, 8),  # sharded fp32 flat parameters and grads, moments
    ("zero3", "bf16-mixed"): (2, 2, 12),  # bf16 weights and grads, fp32 master + moments
    ("ddp", "fp32"): (4, 4, 8),
    ("fsdp", "fp32"): (4, 4, 8),
    ("zero3", "fp32"): (4, 4, 8),
}


def reference_bytes(c: Counts, lora: bool, compute: int = 2) -> float:
    """The engine's frozen copy of the backbone (KL monitor and penalty): a deep copy of
    the backbone as built, not sharded: float32 weights for a full fine-tune, the base
    in the compute dtype under LoRA, and the frozen encoders."""
    return (compute if lora else 4) * c.trained + c.frozen_bytes


def plan(c: Counts, s: Setup) -> dict[str, float]:
    """Per-GPU bytes of one iteration: persistent terms, the update's and the rollout's
    transient terms, and ``peak`` = persistent + max(update, rollout). See
    docs/scaling.md for the terms."""
    if s.engine not in ENGINES:
        raise ValueError(f"engine {s.engine!r}: choose one of {', '.join(ENGINES)}")
    shard = s.gpus if s.engine in ("fsdp", "zero3") else 1
    mixed = s.precision == "bf16-mixed"
    w_b, g_b, o_b = STATE_BYTES[(s.engine, s.precision)]
    trained = c.adapters if s.lora else c.trained
    compute = 2 if mixed else 4  # bytes of a weight as the forward reads it
    out: dict[str, float] = {}
    out["weights"] = w_b * trained / shard
    out["gradients"] = g_b * trained / shard
    out["optimizer"] = o_b * trained / shard
    # LoRA: the frozen base in the compute dtype, sharded like the rest by FSDP / ZeRO-3
    out["frozen_base"] = compute * c.trained / shard if s.lora else 0.0
    out["frozen_encoders"] = float(c.frozen_bytes)
    # DDP's reducer copies every gradient into its buckets (gradient_as_bucket_view=False)
    out["ddp_buckets"] = g_b * trained if (s.engine == "ddp" and s.gpus > 1) else 0.0
    out["reference_copy"] = reference_bytes(c, s.lora, compute) if s.reference else 0.0
    persistent = sum(out.values())

    # transient, during forward/backward
    autocast = 2.0 * trained if (s.engine == "ddp" and mixed) else 0.0  # bf16 copies of fp32 weights
    gathered = 0.0
    if s.engine in ("fsdp", "zero3"):
        # the unit being computed and the one prefetched, unsharded, in the compute dtype
        gathered = 2 * compute * c.unit
    grad_unit = compute * (c.unit if not s.lora else 0)  # a unit's full gradient before reduce-scatter
    key = "checkpointing" if s.checkpointing else "plain"
    act = (c.train_lora if s.lora else c.train)[key]
    activations = s.term_chunk * act(s.micro_batch)
    step_temp = 4.0 * trained / shard if s.foreach else 4.0 * (c.largest_tensor if not s.lora else 0)
    update = max(activations + autocast + gathered + (grad_unit if shard > 1 else 0.0), step_temp)
    local = math.ceil(c.batch / s.gpus)
    rb = min(s.rollout_batch, local)
    sampler = c.infer(rb) + c.sampler(rb)
    decode = c.decode(min(rb, c.decode_chunk)) if c.decode_chunk else 0.0
    rollout = local * c.trajectory_bytes + autocast + gathered + max(sampler, decode)
    out.update(
        persistent=persistent,
        activations=activations,
        autocast_copies=autocast,
        gathered_units=gathered,
        optimizer_step=step_temp,
        update=update,
        training_step=persistent + update,
        rollout_forward=c.infer(rb),
        sampler_buffers=c.sampler(rb),
        decode=decode,
        trajectories=local * c.trajectory_bytes,
        rollout=rollout,
        peak=persistent + max(update, rollout),
    )
    return out


# --------------------------------------------------------------------------- checks


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t):
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]


@contextmanager
def _peak_bytes(device: torch.device, before: Callable[[], int]) -> Iterator[dict[str, float]]:
    """Peak bytes of the block: on CUDA ``torch.cuda.max_memory_allocated`` (everything
    allocated); elsewhere ``before()`` (the bytes existing at the start) + the peak of
    :class:`LiveBytes`. Both are reported on CUDA."""
    out: dict[str, float] = {}
    base = before()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with LiveBytes() as live:
        yield out
    out["live_bytes"] = base + live.peak
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["max_memory_allocated"] = float(torch.cuda.max_memory_allocated(device))
    out["measured"] = out.get("max_memory_allocated", out["live_bytes"])


def _build_on(spec: Spec, variant: Variant, device: torch.device):
    """The spec's backbone with random weights, built directly on ``device``."""
    return spec.build(replace(variant, device=str(device)))


def check_step(
    spec: Spec, counts: Counts, device: torch.device, lora: bool, checkpointing: bool, b: int, autocast: bool
) -> dict[str, Any]:
    """A real training step of ``spec`` against the formula.

    The step is the engine's steady state: AdamW states exist (one step was taken
    before), gradients are set to None, two micro-batches of ``b`` trajectories are
    back-propagated (one loss term each; the second runs with the first's gradients
    allocated), the gradients are clipped and AdamW steps. ``autocast``: the backbone
    keeps float32 weights and runs under bf16 autocast (accelerate's DDP mixed
    precision); else float32 throughout. Predicted: :func:`plan` for DDP on one
    process, update phase only."""
    variant = Variant(dtype=torch.float32, lora=lora, checkpointing=checkpointing)
    backbone, _ = _build_on(spec, variant, device)
    backbone.train()
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=device.type == "cuda")
    ctx = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if autocast
        else (lambda: torch.autocast(device.type, enabled=False))
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(2):
            with on_meta(), ctx():
                loss = replay_loss(backbone, spec, b)
            loss.backward()
            del loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()  # AdamW's states exist from here on, as in every step after the first

    def existing() -> int:
        opt.zero_grad(set_to_none=True)
        tensors = [*backbone.parameters(), *backbone.buffers(), *_optimizer_tensors(opt)]
        return _storage_bytes(tensors)

    with _peak_bytes(device, existing) as measured:
        step()
    setup = Setup(
        engine="ddp",
        gpus=1,
        lora=lora,
        checkpointing=checkpointing,
        micro_batch=b,
        precision="bf16-mixed" if autocast else "fp32",
        foreach=device.type == "cuda",
    )
    predicted = plan(counts, setup)
    value = predicted["persistent"] + predicted["update"]
    return {
        "model": spec.name,
        "phase": "update",
        "lora": lora,
        "checkpointing": checkpointing,
        "micro_batch": b,
        "precision": setup.precision,
        "predicted": value,
        **measured,
        "ratio": value / measured["measured"],
        "terms": predicted,
    }


def check_rollout(spec: Spec, counts: Counts, device: torch.device, b: int) -> dict[str, Any]:
    """A real rollout of ``b`` trajectories (the ``confidence`` sampler, T steps, the
    Meissonic schedule; guided when the spec is) and the decoding of the result (image
    backbones, ``spec.decode_chunk`` images per call), against
    the formula's rollout term with the model's weights only (no optimizer)."""
    backbone, _ = _build_on(spec, Variant(dtype=torch.float32), device)
    backbone.eval()

    def existing() -> int:
        return _storage_bytes([*backbone.parameters(), *backbone.buffers()])

    with torch.no_grad(), on_meta(), _peak_bytes(device, existing) as measured:
        traj = sample(backbone, spec, b)
        stored = stored_bytes(traj)
        for chunk in traj.final_tokens.split(spec.decode_chunk) if spec.decode_chunk else ():
            backbone.decode(chunk)
    fp32 = replace(counts, batch=b)
    predicted = plan(fp32, Setup(engine="ddp", gpus=1, rollout_batch=b, precision="fp32"))
    value = predicted["weights"] + predicted["frozen_encoders"] + predicted["rollout"]
    return {
        "model": spec.name,
        "phase": "rollout",
        "batch": b,
        "steps": spec.steps,
        "predicted": value,
        **measured,
        "ratio": value / measured["measured"],
        "trajectory_bytes_measured": stored / b,
        "trajectory_bytes_layout": counts.trajectory_bytes,
        "terms": predicted,
    }


# --------------------------------------------------------------------------- tables


def table_setups(c: Counts, spec: Spec, **fixed: Any) -> list[tuple[str, list[Setup]]]:
    """Rows (full fine-tune / LoRA, with / without checkpointing) x columns (engine x GPUs)."""
    rows = []
    for lora in (False, True) if c.adapters else (False,):
        for ckpt in (False, True) if c.train.get("checkpointing") else (False,):
            what = f"LoRA r={spec.lora_rank}" if lora else "full"
            label = f"{what}, {'checkpointing' if ckpt else 'no checkpointing'}"
            cols = [
                Setup(engine=e, gpus=g, lora=lora, checkpointing=ckpt, **fixed)
                for e in ENGINES
                for g in GPU_COUNTS
            ]
            rows.append((label, cols))
    return rows


#: Print tables as Markdown (``--markdown``) instead of fixed-width text.
MARKDOWN = {"on": False}


def show(rows: list[list[Any]], headers: list[str]) -> None:
    """Print a table: fixed-width text, or Markdown with ``--markdown`` (what
    docs/scaling.md quotes)."""
    if not MARKDOWN["on"]:
        print(common.table(rows, headers))
        return
    cells = [[common._fmt(c) for c in row] for row in rows]
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in cells:
        print("| " + " | ".join(row) + " |")


def gib(x: float) -> float:
    return round(x / GIB, 2)


def scale(values: list[float]) -> tuple[str, float]:
    """("GiB", 2**30), or ("MiB", 2**20) when every value is below 1 GiB."""
    return ("GiB", GIB) if max(values, default=0.0) >= GIB else ("MiB", 2**20)


def print_counts(spec: Spec, c: Counts) -> None:
    print(f"-- {spec.label}: measured on the meta device")
    rows = [
        ["trained network parameters", f"{c.trained:,}"],
        [f"LoRA adapters (r = {spec.lora_rank})", f"{c.adapters:,}"],
        ["frozen encoders (GiB as stored)", gib(c.frozen_bytes)],
        ["largest block (parameters)", f"{c.unit:,}"],
    ]
    for lora, acts in (("full", c.train), ("LoRA", c.train_lora)):
        for key, fit in acts.items():
            rows.append(
                [
                    f"activations per trajectory, {lora}, {key} (GiB / KiB per token)",
                    f"{gib(fit.per_item)} / {fit.per_item / c.tokens / 1024:.1f}",
                ]
            )
    rows += [
        ["sampler forward per trajectory (GiB)", gib(c.infer.per_item)],
        ["sampler buffers per trajectory (GiB, CPU, shallow model)", gib(c.sampler.per_item)],
        [
            f"decoder call, {spec.decode_chunk} images / 1 image (GiB)",
            f"{gib(c.decode(spec.decode_chunk))} / {gib(c.decode(1))}",
        ],
        ["stored trajectory (MiB)", round(c.trajectory_bytes / 2**20, 2)],
        [
            "reference copy for the KL monitor (GiB, full / LoRA)",
            f"{gib(reference_bytes(c, False))} / {gib(reference_bytes(c, True))}",
        ],
    ]
    show(rows, ["quantity", "value"])


#: What the plan tables show: (title, key of the plan record, images per decoder call
#: or None for the backbone's own).
PHASES = (
    ("training step (persistent + update)", "training_step", None),
    ("whole iteration (persistent + max(update, rollout))", "peak", None),
    ("whole iteration, one image per decoder call", "peak", 1),
)


def print_plan(spec: Spec, c: Counts, fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan tables of ``spec``: one per :data:`PHASES` (the last only when the
    backbone decodes several images per call), rows = variants, columns = engine x
    GPUs. Returns every cell's setup and terms."""
    heads = ["variant"] + [f"{ENGINE_LABELS[e]} x{g}" for e in ENGINES for g in GPU_COUNTS]
    rows_of = table_setups(c, spec, **fixed)
    out = []
    for title, key, chunk in PHASES:
        if chunk is not None and c.decode_chunk <= chunk:
            continue
        counts = c if chunk is None else replace(c, decode_chunk=chunk)
        cells = {label: [plan(counts, s) for s in setups] for label, setups in rows_of}
        unit, size = scale([t[key] for terms in cells.values() for t in terms])
        rows = [[label, *[round(t[key] / size, 2) for t in terms]] for label, terms in cells.items()]
        print(f"-- {spec.label}: {title}, {unit} per GPU; {fixed}")
        show(rows, heads)
        if chunk is None and not out:
            out = [
                {"variant": label, **asdict(s), "terms": t}
                for label, setups in rows_of
                for s, t in zip(setups, cells[label])
            ]
    return out


def print_checks(checks: list[dict[str, Any]]) -> None:
    rows = []
    for r in checks:
        what = (
            f"step, {'LoRA' if r['lora'] else 'full'}, {'ckpt' if r['checkpointing'] else 'no ckpt'}, "
            f"b={r['micro_batch']}, {r['precision']}"
            if r["phase"] == "update"
            else f"rollout, b={r['batch']}, T={r['steps']}"
        )
        rows.append([r["model"], what, r["predicted"] / 2**20, r["measured"] / 2**20, r["ratio"]])
    show(rows, ["model", "check", "predicted MiB", "measured MiB", "ratio"])


def fits(c: Counts, device: torch.device, lora: bool) -> bool:
    """Whether a float32 step (weights, gradients, AdamW, its step buffer: 20 bytes per
    trained parameter, plus a frozen base) fits in the device's memory; always on CPU."""
    if device.type != "cuda":
        return True
    need = 20 * (c.adapters if lora else c.trained) + (4 * c.trained if lora else 0) + c.frozen_bytes
    return need < 0.8 * torch.cuda.get_device_properties(device).total_memory


def run_checks(
    spec: Spec, device: torch.device, quick: bool, measured: Callable[[Spec, torch.dtype], Counts] = count
) -> list[dict[str, Any]]:
    """The update steps (every variant the spec has, fp32; full fine-tune under bf16
    autocast) and a rollout of ``spec`` on ``device``, against the formula; the counts
    come from ``measured(spec, dtype)``. On a GPU, variants whose float32 state does not
    fit (LLaDA-8B's full fine-tune) are left out."""
    fp32 = measured(spec, torch.float32)
    b = 1 if spec.name in PLANNED else (2 if spec.cfg else 8)
    out = []
    for lora in (False, True) if spec.lora_rank else (False,):
        if not fits(fp32, device, lora):
            continue
        for ckpt in (False, True) if spec.checkpointing else (False,):
            out.append(check_step(spec, fp32, device, lora, ckpt, b, autocast=False))
    if spec.dtype == torch.bfloat16 and fits(fp32, device, False):
        # autocast keeps the weights (and the frozen encoders with them) in float32
        mixed = replace(measured(spec, torch.bfloat16), frozen_bytes=fp32.frozen_bytes)
        out.append(check_step(spec, mixed, device, False, False, b, autocast=True))
    out.append(check_rollout(spec, fp32, device, 2 if quick else 4))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma list of planned models (default: all)")
    p.add_argument("--micro-batch", type=int, default=1, help="trajectories per backward (default 1)")
    p.add_argument("--term-chunk", type=int, default=1, help="loss terms per backward (default 1)")
    p.add_argument("--rollout-batch", type=int, default=4, help="trajectories per sampler call (default 4)")
    p.add_argument(
        "--reference",
        action="store_true",
        help="count the engine's frozen reference copy of the backbone (logging.kl_every > 0 or kl_beta > 0)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the measured checks")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = p.parse_args(argv)
    device = common.setup(args)
    MARKDOWN["on"] = args.markdown
    env = common.environment(device)
    common.header("memory plan: per-GPU bytes of one RL iteration", device)
    all_specs = specs(args.quick)
    planned = [s for s in all_specs.values() if s.name in PLANNED or args.quick]
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = sorted(set(names) - set(all_specs))
        if unknown:
            p.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(all_specs)}")
        planned = [all_specs[n] for n in names]
    fixed = dict(
        micro_batch=args.micro_batch,
        term_chunk=args.term_chunk,
        rollout_batch=args.rollout_batch,
        reference=args.reference,
    )
    results: dict[str, Any] = {"setup": fixed, "models": {}, "checks": []}
    cache: dict[tuple[str, torch.dtype], Counts] = {}

    def measured(spec: Spec, dtype: torch.dtype | None = None) -> Counts:
        key = (spec.name, dtype or spec.dtype)
        if key not in cache:
            cache[key] = count(spec, key[1], (1, 2) if args.quick else TRAIN_BATCHES)
        return cache[key]

    for spec in planned:
        c = measured(spec)
        print_counts(spec, c)
        results["models"][spec.name] = {
            "label": spec.label,
            "notes": spec.notes,
            "counts": asdict(c),
            "plan": print_plan(spec, c, fixed),
        }
    targets: dict[str, Any] = {}
    if not args.no_check:
        # the small configs everywhere; on a GPU the planned models too
        checked = [s for s in all_specs.values() if s.name not in PLANNED]
        if device.type == "cuda":
            checked = [s for s in planned if s.name in PLANNED] + checked
        for spec in checked:
            results["checks"] += run_checks(spec, device, args.quick, measured)
        print(f"-- check: formula / measured peak on {common.device_label(device)}")
        print_checks(results["checks"])
        ratios = [r["ratio"] for r in results["checks"]]
        targets["lowest formula / measured"] = common.target(min(ratios), f">= {CHECK_RANGE[0]}")
        targets["highest formula / measured"] = common.target(max(ratios), f"<= {CHECK_RANGE[1]}")
    return common.finish(args, env, results, targets)


if __name__ == "__main__":
    main()
