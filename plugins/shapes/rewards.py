"""Exact rewards of the shapes world: prompt alignment and image quality.

All read only the token grid and the prompt text (the prompt is parsed; no scene is
stored). Formulas, as in docs/shapes-world.md, over the connected components c of a
grid (:mod:`.detect`):

- alignment = (requirements met) / (requirements of the prompt), GenEval-style;
- quality = sum_c credit_c * (area_c - contact_c) / (non-background tokens), with
  credit_c = clip((IoU_c - 1/2) / (1 - 1/2), 0, 1) for IoU_c the overlap with the
  best-fitting template, and contact_c its tokens touching another component;
- clean = (tokens in clean objects) / (non-background tokens): the strict quality.

quality and clean are 0 for a blank grid.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import GeneratedBatch, NoOptions, Rewarder
from mdmrl_plugins.shapes.detect import (
    FIT_THRESHOLD,
    DetectedObject,
    ObjectTable,
    detect_batch,
    relation_holds_array,
)
from mdmrl_plugins.shapes.grammar import PLURALS, RELATIONS, Requirements, parse
from mdmrl_plugins.shapes.world import CODEBOOK_SIZE, COLOURS, GRID, SHAPES


@dataclass(frozen=True)
class RequirementResult:
    """One requirement of a prompt: kind ("object", "colour", "count", "relation"),
    a readable statement, and whether the grid meets it."""

    kind: str
    text: str
    met: bool


@dataclass(frozen=True)
class ScoreDetail:
    """Scores of one grid for one prompt, with the evidence."""

    prompt: str
    alignment: float
    quality: float
    clean: float
    requirements: tuple[RequirementResult, ...]
    objects: tuple[DetectedObject, ...]


_SHAPE_ID = {name: i for i, name in enumerate(SHAPES)}
_COLOUR_ID = {name: i for i, name in enumerate(COLOURS)}


def _counts(table: ObjectTable) -> list:
    """Classified objects per grid, shape and colour id: nested lists [B][S][V + 1]."""
    b, s, v = len(table.foreground), len(SHAPES), CODEBOOK_SIZE + 1
    ok = table.shape >= 0
    key = (table.batch[ok] * s + table.shape[ok]) * v + table.colour[ok]
    return np.bincount(key, minlength=b * s * v).reshape(b, s, v).tolist()


def _check(
    req: Requirements, counts: list, table: ObjectTable, span: slice, explain: bool
) -> list[RequirementResult]:
    """Evaluate every requirement of ``req`` for one grid: ``counts`` [S][V + 1] of its
    classified objects, table[span] its objects (read only for a relation)."""
    out: list[RequirementResult] = []
    for p in req.objects:
        per_colour = counts[_SHAPE_ID[p.shape]]
        n_shape = sum(per_colour)
        out.append(RequirementResult("object", f"a {p.shape} is present" if explain else "", n_shape > 0))
        found = n_shape
        if p.colour is not None:
            found = per_colour[_COLOUR_ID[p.colour]]
            out.append(
                RequirementResult(
                    "colour", f"a {p.colour} {p.shape} is present" if explain else "", found > 0
                )
            )
        if p.count != 1:
            text = ""
            if explain:
                col = f"{p.colour} " if p.colour else ""
                text = f"exactly {p.count} {col}{PLURALS[p.shape]} (found {found})"
            out.append(RequirementResult("count", text, found == p.count))
    if req.relation is not None:
        shape, colour = table.shape[span], table.colour[span]
        ids = []
        for p in req.objects:
            match = shape == _SHAPE_ID[p.shape]
            if p.colour is not None:
                match &= colour == _COLOUR_ID[p.colour]
            ids.append(np.flatnonzero(match))
        ia, ib = ids
        rows, cols = table.row[span], table.col[span]
        dy = rows[ia][:, None] - rows[ib][None, :]
        dx = cols[ia][:, None] - cols[ib][None, :]
        ok = relation_holds_array(req.relation, dy, dx) & (ia[:, None] != ib[None, :])
        text = ""
        if explain:
            text = f"{req.objects[0].text()} is {' '.join(RELATIONS[req.relation])} {req.objects[1].text()}"
        out.append(RequirementResult("relation", text, bool(ok.any())))
    return out


def _share(table: ObjectTable, tokens: np.ndarray) -> np.ndarray:
    """sum of ``tokens`` [K] per grid / non-background tokens of the grid; 0 when blank."""
    fg = table.foreground
    total = np.bincount(table.batch, weights=tokens, minlength=len(fg))
    return np.where(fg > 0, total / np.maximum(fg, 1), 0.0).astype(np.float32)


def credit(fit: np.ndarray) -> np.ndarray:
    """Per-component shape credit clip((IoU - theta) / (1 - theta), 0, 1), theta = FIT_THRESHOLD."""
    return np.clip((np.asarray(fit) - FIT_THRESHOLD) / (1.0 - FIT_THRESHOLD), 0.0, 1.0)


def _quality(table: ObjectTable) -> np.ndarray:
    """Graded quality [B]: every component's tokens that touch no other component,
    weighted by its template credit, over the non-background tokens."""
    return _share(table, credit(table.fit) * (table.area - table.contact))


def _clean(table: ObjectTable) -> np.ndarray:
    """Strict quality [B]: tokens in clean objects over the non-background tokens."""
    return _share(table, np.where(table.clean, table.area, 0))


def _alignment(prompts: list[str], table: ObjectTable) -> np.ndarray:
    counts = _counts(table)
    if len(prompts) != len(counts):
        raise ValueError(f"got {len(counts)} grids but {len(prompts)} prompts")
    out = np.zeros(len(prompts), dtype=np.float32)
    bounds = np.searchsorted(table.batch, np.arange(len(prompts) + 1)).tolist()
    for i, prompt in enumerate(prompts):
        results = _check(parse(prompt), counts[i], table, slice(bounds[i], bounds[i + 1]), explain=False)
        out[i] = sum(r.met for r in results) / len(results)
    return out


def score_batch(prompts: list[str], tokens) -> tuple[np.ndarray, np.ndarray]:
    """(alignment, quality), each float32 [B], of grids tokens [B, 256] or [B, 16, 16]."""
    table = detect_batch(tokens)
    return _alignment(prompts, table), _quality(table)


def score(prompt: str, grid) -> ScoreDetail:
    """Score one grid (int [16, 16] or [256]) against a prompt of the grammar."""
    req = parse(prompt)
    table = detect_batch(grid)
    if len(table.foreground) != 1:
        raise ValueError("score takes one grid; use score_batch for several")
    results = _check(req, _counts(table)[0], table, table.span(0), explain=True)
    return ScoreDetail(
        prompt=prompt,
        alignment=sum(r.met for r in results) / len(results),
        quality=float(_quality(table)[0]),
        clean=float(_clean(table)[0]),
        requirements=tuple(results),
        objects=tuple(table.objects(0)),
    )


_cache_lock = threading.Lock()
_cache: tuple = (None, -1, None)  # (weak reference to a tokens tensor, its version, its ObjectTable)


def _detect_shared(tokens: torch.Tensor) -> ObjectTable:
    """detect_batch with a one-entry cache keyed on the tensor object and its version
    counter (bumped by every in-place torch op), so the two rewarders of one
    composite detect a batch only once."""
    global _cache
    if not isinstance(tokens, torch.Tensor):
        return detect_batch(tokens)
    with _cache_lock:
        ref, version, table = _cache
        if ref is not None and ref() is tokens and version == tokens._version:
            return table
    table = detect_batch(tokens)
    with _cache_lock:
        _cache = (weakref.ref(tokens), tokens._version, table)
    return table


def _check_batch(name: str, batch: GeneratedBatch) -> None:
    if tuple(batch.grid_shape) != (GRID, GRID):
        raise UserError(
            f"rewarder {name!r} scores {GRID}x{GRID} shapes-world grids but the backbone makes "
            f"{tuple(batch.grid_shape)} grids; use it with the shapes backbone"
        )


class ShapesAlignment(Rewarder):
    """GenEval-style prompt alignment in [0, 1]: the fraction of the prompt's
    requirements (objects, colours, exact counts, relations) the grid meets."""

    name = "shapes-alignment"
    Options = NoOptions

    def __init__(self, options: NoOptions | None = None):
        self.options = options or NoOptions()

    def score(self, batch: GeneratedBatch) -> torch.Tensor:
        """tokens long [B, 256] + B prompts -> float32 [B] on CPU."""
        _check_batch(self.name, batch)
        return torch.from_numpy(_alignment(list(batch.prompts), _detect_shared(batch.tokens)))


class ShapesQuality(Rewarder):
    """Graded image quality in [0, 1]: each object's tokens weighted by how well it
    fits the closest template (IoU 1/2 or less earns nothing, an exact template
    everything) and minus the tokens that touch another object, over all
    non-background tokens; 0 for a blank grid."""

    name = "shapes-quality"
    Options = NoOptions
    _formula = staticmethod(_quality)

    def __init__(self, options: NoOptions | None = None):
        self.options = options or NoOptions()

    def score(self, batch: GeneratedBatch) -> torch.Tensor:
        """tokens long [B, 256] -> float32 [B] on CPU (prompts are not read)."""
        _check_batch(self.name, batch)
        return torch.from_numpy(self._formula(_detect_shared(batch.tokens)))


class ShapesClean(ShapesQuality):
    """Strict image quality in [0, 1]: the fraction of non-background tokens in clean
    shapes (exact templates touching nothing); 0 for a blank grid."""

    name = "shapes-clean"
    _formula = staticmethod(_clean)
