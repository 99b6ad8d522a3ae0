"""Fixtures of the Meissonic tests (the tiny parts live in meissonic_tiny.py)."""

from __future__ import annotations

import pytest
from meissonic_tiny import (
    TINY_RESOLUTION,
    clip_tokenizer,
    tiny_text_encoder,
    tiny_transformer,
    tiny_vqvae,
)


@pytest.fixture(scope="session", name="clip_tokenizer")
def clip_tokenizer_fixture(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory.mktemp("clip_bpe"))


@pytest.fixture
def tiny_parts(clip_tokenizer):
    """(transformer, vqvae, text_encoder, tokenizer), freshly built, float32."""
    return tiny_transformer(), tiny_vqvae(), tiny_text_encoder(), clip_tokenizer


@pytest.fixture
def make_backbone(clip_tokenizer):
    """Build a tiny MeissonicBackbone from fresh parts (same seeds, so same weights every
    call); keyword arguments override MeissonicOptions fields."""
    from mdmrl_plugins.meissonic.backbone import MeissonicBackbone, MeissonicOptions

    def make(**overrides):
        options = MeissonicOptions(**{"resolution": TINY_RESOLUTION, **overrides})
        parts = tiny_transformer(), tiny_vqvae(), tiny_text_encoder(), clip_tokenizer
        return MeissonicBackbone.from_modules(*parts, options=options)

    return make
