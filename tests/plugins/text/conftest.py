"""Fixtures of the text tests: a tiny ``llada`` backbone (locally trained tokenizer,
random weights) and a factory for more."""

from __future__ import annotations

import pytest

#: completion length of the tiny backbones
N = 12


@pytest.fixture(scope="session")
def tokenizer():
    from mdmrl_plugins.llada.tiny import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture
def make_backbone(tokenizer):
    """A fresh tiny ``llada`` backbone (same seed, same weights every call); keyword
    arguments are LLaDAOptions fields (plus ``seed``, ``std`` of the random init)."""
    from mdmrl_plugins.llada.backbone import LLaDABackbone, LLaDAOptions
    from mdmrl_plugins.llada.tiny import random_model, tiny_config

    def make(seed: int = 0, std: float = 0.3, **options):
        model = random_model(tiny_config(tokenizer), seed, std)
        opts = {"dtype": "float32", "gen_length": N, "max_prompt_length": 48, **options}
        return LLaDABackbone(model, tokenizer, LLaDAOptions(**opts))

    return make
