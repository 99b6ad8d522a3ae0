"""What mdmrl's text parts expect of a text backbone, and the end-of-sequence rule.

A text masked diffusion model (LLaDA, Dream, the text side of MMaDA) fits the
:class:`~mdmrl.interfaces.Backbone` interface as it is, with these conventions
(docs/text.md):

- the token "grid" is the completion: ``grid_shape = (1, gen_length)``, N = gen_length;
  the prompt is not part of it, so no sampler or re-mask function can mask it;
- :meth:`~mdmrl.interfaces.Backbone.encode_prompts` returns the prompt as a
  :class:`~mdmrl.trajectory.Conditioning` of a fixed length L (left-padded,
  ``attention_mask`` False on padding) so that any two conditionings concatenate;
  ``null_conditioning`` is the encoding of the empty prompt;
- ``forward(tokens [B, N], cond, timestep)`` returns logits over the whole vocabulary
  ``[B, N, V]`` (``codebook_size = V``); the mask id may lie inside the vocabulary
  (LLaDA's 126336 does), and text samplers never emit it;
- ``decode`` renders the completions as images (for grids); rewards read text.

and, beyond the interface, the attributes and method of :class:`TextBackbone`:
``eos_token_ids``, ``pad_token_id`` and ``decode_text``.

The end-of-sequence rule (LLaDA's): everything after the first end-of-sequence token
of a completion is padding. Rewards read the text before it (``decode_text``), the
samplers' step log-probs sum over positions up to and including it
(:func:`completion_mask`), and MaskGRPO scores the completion with the padding
written as the pad token (:func:`pad_after_eos`), as LLaDA's supervised data pads
answers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TextBackbone(Protocol):
    """The text-specific part of a text backbone (besides the Backbone interface)."""

    #: ids that end a completion (e.g. LLaDA's <|endoftext|> and <|eot_id|>)
    eos_token_ids: tuple[int, ...]
    #: the id that pads a completion after its end (LLaDA: <|endoftext|>)
    pad_token_id: int

    def decode_text(self, tokens: torch.Tensor) -> list[str]:
        """Completions long [B, N] -> B strings: the text before the first
        end-of-sequence token, special tokens left out."""


def is_text_backbone(backbone) -> bool:
    """True when ``backbone`` has the :class:`TextBackbone` attributes and method."""
    return isinstance(backbone, TextBackbone)


def first_eos(tokens: torch.Tensor, eos_ids) -> torch.Tensor:
    """Index of the first end-of-sequence token of every row, long [B]; N for a row
    without one. tokens: long [B, N]; eos_ids: iterable of ints."""
    ids = torch.as_tensor(list(eos_ids), dtype=tokens.dtype, device=tokens.device)
    is_eos = torch.isin(tokens, ids)
    n = tokens.shape[-1]
    return torch.where(is_eos.any(-1), is_eos.int().argmax(-1), torch.full_like(tokens[:, 0], n))


def completion_mask(tokens: torch.Tensor, eos_ids) -> torch.Tensor:
    """bool [B, N]: True up to and including the first end-of-sequence token of each
    row (the whole row without one); the positions after it are padding."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    return positions[None, :] <= first_eos(tokens, eos_ids)[:, None]


def pad_after_eos(tokens: torch.Tensor, eos_ids, pad_id: int) -> torch.Tensor:
    """tokens long [B, N] with every position after the first end-of-sequence token
    replaced by ``pad_id`` (a new tensor)."""
    return torch.where(completion_mask(tokens, eos_ids), tokens, torch.full_like(tokens, int(pad_id)))
