"""Small LLaDA checkpoints built locally: a byte-level BPE tokenizer with LLaDA's
special tokens and chat format, a tiny :class:`LLaDAConfig` around it, and a writer
for a complete checkpoint folder (config.json, sharded safetensors with their index,
tokenizer files) in the published layout.

Tests load these folders through the same path a downloaded LLaDA-8B checkpoint takes;
a small text world can ship one as its model (docs/text.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mdmrl_plugins.llada.model import LLaDAConfig, LLaDAModel, save_checkpoint

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
HEADER_START, HEADER_END, END_OF_TURN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = (BOS, EOS, MASK, HEADER_START, HEADER_END, END_OF_TURN)

#: A chat template in LLaDA-Instruct's turn format: BOS, then per message
#: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, then the assistant
#: header when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    + HEADER_START
    + "{{ message['role'] }}"
    + HEADER_END
    + "\n\n{{ message['content'] | trim }}"
    + END_OF_TURN
    + "{% endfor %}{% if add_generation_prompt %}"
    + HEADER_START
    + "assistant"
    + HEADER_END
    + "\n\n{% endif %}"
)

#: Text the tokenizer's merges are learnt from when no corpus is given.
DEFAULT_CORPUS = (
    "Solve the problem step by step. <reasoning> First add the numbers, then multiply. </reasoning>",
    "The answer is \\boxed{42}. Tom has 3 apples and buys 4 more, so he has 7 apples.",
    "How many pencils are left if Ann gives away 5 of her 12 pencils? 12 - 5 = 7 pencils.",
    "A train travels 60 miles per hour for 2 hours: 60 * 2 = 120 miles.",
)


def byte_level_tokenizer(corpus=DEFAULT_CORPUS, vocab_size: int = 320, chat_template: str = CHAT_TEMPLATE):
    """A ``PreTrainedTokenizerFast``: byte-level BPE (every string encodes and decodes
    exactly) with merges learnt from ``corpus``, LLaDA's special tokens
    (:data:`SPECIAL_TOKENS`; EOS doubles as padding, as LLaDA's training pads with it)
    and ``chat_template``. Deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, mask_token=MASK
    )
    fast.chat_template = chat_template
    return fast


def tiny_config(tokenizer, **overrides) -> LLaDAConfig:
    """A small LLaDA config for ``tokenizer``: vocabulary rounded up to a multiple of 64
    (as LLaDA pads its 126464 embeddings), mask / EOS / pad ids from the tokenizer;
    width 32, 2 blocks, 4 heads (2 key/value heads), MLP 64, RoPE base 10000, unless
    ``overrides`` say otherwise."""
    rows = -(-len(tokenizer) // 64) * 64
    fields = {
        "d_model": 32,
        "n_heads": 4,
        "n_kv_heads": 2,
        "n_layers": 2,
        "mlp_hidden_size": 64,
        "vocab_size": rows,
        "embedding_size": rows,
        "max_sequence_length": 1024,
        "rope_theta": 10000.0,
        "mask_token_id": tokenizer.convert_tokens_to_ids(MASK),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS),
        "pad_token_id": tokenizer.convert_tokens_to_ids(EOS),
    }
    fields.update(overrides)
    return LLaDAConfig(**fields)


def random_model(config: LLaDAConfig, seed: int = 0, std: float = 0.02) -> LLaDAModel:
    """A :class:`LLaDAModel` with Normal(0, std) weights drawn from a generator seeded
    with ``seed`` (the caller's global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDAModel(config)
        model.reset_parameters(std)
    return model


def write_checkpoint(
    folder: Path | str,
    tokenizer,
    config: LLaDAConfig | None = None,
    seed: int = 0,
    max_shard_bytes: int = 64 * 2**10,
    dtype: torch.dtype = torch.float32,
) -> LLaDAModel:
    """Write a complete checkpoint folder for a random model of ``config`` (default:
    :func:`tiny_config` of the tokenizer): config.json, weights in shards of at most
    ``max_shard_bytes`` (small, so that even a tiny model is split) with their index,
    and the tokenizer files. Returns the model written."""
    model = random_model(config or tiny_config(tokenizer), seed).to(dtype)
    save_checkpoint(model, folder, max_shard_bytes)
    tokenizer.save_pretrained(str(folder))
    return model


def tiny_backbone(tokenizer, config: LLaDAConfig | None = None, seed: int = 0, **options):
    """An in-memory ``llada`` backbone around a random model of ``config`` (default:
    :func:`tiny_config`), float32 unless ``options`` say otherwise; ``options`` are
    :class:`~mdmrl_plugins.llada.backbone.LLaDAOptions` fields."""
    from mdmrl_plugins.llada.backbone import LLaDABackbone, LLaDAOptions

    model = random_model(config or tiny_config(tokenizer), seed)
    return LLaDABackbone(model, tokenizer, LLaDAOptions(**{"dtype": "float32", **options}))
