"""Fixtures of the LLaDA tests: a locally trained byte-level tokenizer and a tiny
checkpoint folder in the published layout."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from mdmrl_plugins.llada.tiny import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """(folder, the model written there): config.json, sharded weights with their
    index, tokenizer files."""
    from mdmrl_plugins.llada.tiny import write_checkpoint

    folder = tmp_path_factory.mktemp("llada") / "tiny-llada"
    return folder, write_checkpoint(folder, tokenizer)
