"""Exact object detectors for shapes-world grids.

An object is a connected component of one colour, 8-connected (tokens that touch at a
side or a corner join). Each component gets its colour, pixel count, centroid,
bounding box, a shape class from its geometry (:func:`classify`), its fit to the
best-fitting template at any offset (:func:`template_fit`), the number of its tokens
that touch another object, and a ``clean`` flag (it is exactly one of the world's
templates and touches no other non-background token). :func:`detect_batch` does this for a whole batch with numpy array operations;
:func:`find_objects` is the one-grid view. See docs/shapes-world.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from mdmrl_plugins.shapes.world import CODEBOOK_SIZE, COLOURS, GRID, SHAPES, templates

#: Smallest and largest bounding-box side (tokens) of a component that can be a shape.
MIN_EXTENT = 3
MAX_EXTENT = 10
#: Centroid distance (tokens) a relation needs along its axis.
RELATION_MARGIN = 2.0
#: Template fits (IoU) at or below this are reported as 0 (see :func:`template_fit`).
FIT_THRESHOLD = 0.5

_SQUARE, _CIRCLE, _TRIANGLE = (SHAPES.index(s) for s in ("square", "circle", "triangle"))


@dataclass(frozen=True)
class DetectedObject:
    """One connected component of a grid.

    colour: colour name ("invalid" for ids outside the palette); colour_id: token id
    (V for ids outside the palette);
    shape: a name in :data:`SHAPES` or None when the geometry matches no shape;
    size: number of tokens; centroid: (row, col) mean position; bbox: (top, left,
    bottom, right), inclusive; clean: an exact template, isolated from other tokens;
    isolated: no token of another component among its 8 neighbours; fit: IoU with the
    best-fitting template at any offset when above FIT_THRESHOLD, else 0; contact:
    how many of its tokens have a token of another component among their 8 neighbours.
    """

    colour: str
    colour_id: int
    shape: str | None
    size: int
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    clean: bool
    isolated: bool
    fit: float
    contact: int


@dataclass
class ObjectTable:
    """Every component of a batch as parallel arrays [K], sorted by grid then by the
    first token of the component in reading order.

    batch: grid index; colour: token id; shape: index into SHAPES or -1; area; row,
    col: centroid; top, left, bottom, right: inclusive bbox; clean, isolated: bool;
    fit: float, template IoU above FIT_THRESHOLD or 0; contact: int, tokens touching
    another component. foreground: int [B], non-background tokens per grid.
    """

    batch: np.ndarray
    colour: np.ndarray
    shape: np.ndarray
    area: np.ndarray
    row: np.ndarray
    col: np.ndarray
    top: np.ndarray
    left: np.ndarray
    bottom: np.ndarray
    right: np.ndarray
    clean: np.ndarray
    isolated: np.ndarray
    fit: np.ndarray
    contact: np.ndarray
    foreground: np.ndarray

    def span(self, b: int) -> slice:
        """Rows of grid ``b``."""
        lo, hi = np.searchsorted(self.batch, [b, b + 1])
        return slice(int(lo), int(hi))

    def objects(self, b: int) -> list[DetectedObject]:
        out = []
        for k in range(*self.span(b).indices(len(self.batch))):
            cid = int(self.colour[k])
            out.append(
                DetectedObject(
                    colour=COLOURS[cid] if 0 <= cid < CODEBOOK_SIZE else "invalid",
                    colour_id=cid,
                    shape=SHAPES[self.shape[k]] if self.shape[k] >= 0 else None,
                    size=int(self.area[k]),
                    centroid=(float(self.row[k]), float(self.col[k])),
                    bbox=(int(self.top[k]), int(self.left[k]), int(self.bottom[k]), int(self.right[k])),
                    clean=bool(self.clean[k]),
                    isolated=bool(self.isolated[k]),
                    fit=float(self.fit[k]),
                    contact=int(self.contact[k]),
                )
            )
        return out


def _grids(tokens) -> np.ndarray:
    """tokens [B, 256] / [B, 16, 16] / [16, 16] (array or tensor) -> int64 [B, 16, 16]."""
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().numpy()
    t = np.asarray(tokens, dtype=np.int64)
    if t.ndim == 2 and t.shape == (GRID, GRID):
        t = t[None]
    elif t.ndim == 1 and t.shape[0] == GRID * GRID:
        t = t.reshape(1, GRID, GRID)
    elif t.ndim == 2 and t.shape[1] == GRID * GRID:
        t = t.reshape(-1, GRID, GRID)
    elif not (t.ndim == 3 and t.shape[1:] == (GRID, GRID)):
        raise ValueError(f"expected token grids [B, {GRID * GRID}] or [B, {GRID}, {GRID}], got {t.shape}")
    return t


def _neighbour_pairs(a: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Views (first, second) of [B, H, W] ``a`` for every undirected pair of
    8-neighbour tokens: right, down, down-right and down-left."""
    h, w = a.shape[1:]
    out = []
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        c0, c1 = max(0, -dc), w - max(0, dc)
        out.append((a[:, : h - dr, c0:c1], a[:, dr:, c0 + dc : c1 + dc]))
    return out


def label(grids: np.ndarray) -> np.ndarray:
    """8-connected same-colour components of int [B, H, W] grids.

    Returns int64 [B, H, W]: -1 on background, else the flat index (over the whole
    batch) of the component's first token in reading order. Vectorised union-find:
    every pair of same-colour neighbours is an edge; each round hooks the larger root
    of an edge under the smaller one, then compresses paths, until every edge joins
    equal roots (a few rounds).
    """
    b, h, w = grids.shape
    size = b * h * w
    fg = grids != 0
    idx = np.arange(size, dtype=np.int64).reshape(b, h, w)
    us, vs = [], []
    for (ga, gb), (ia, ib) in zip(_neighbour_pairs(grids), _neighbour_pairs(idx)):
        joined = (ga == gb) & (ga != 0)
        us.append(ia[joined])
        vs.append(ib[joined])
    u, v = np.concatenate(us), np.concatenate(vs)
    parent = np.arange(size, dtype=np.int64)  # parent[x] <= x, always in x's component
    while True:
        pu, pv = parent[u], parent[v]
        if np.array_equal(pu, pv):
            break
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return np.where(fg, parent.reshape(b, h, w), -1)


def classify(h, w, area, corners_tl, corners_tr, corners_bl, corners_br, top, bottom) -> np.ndarray:
    """Shape class from bounding-box geometry (numpy arrays [K]) -> int [K], -1 = none.

    With fill = area / (h * w) and the four bbox corner tokens:
    - square: >= 3 corners filled, fill >= 0.85, |h - w| <= 1;
    - triangle: both bottom corners and neither top corner filled, bottom row at least
      w - 1 long, top row at most max(1, w // 3) long, w >= h, 0.4 <= fill <= 0.75;
    - circle: at most 1 corner filled, |h - w| <= 1, fill >= 0.6, top and bottom rows
      at least 2 long and within 2 of each other;
    - anything else, or a bbox side outside [MIN_EXTENT, MAX_EXTENT]: none.
    """
    h = np.asarray(h)
    w = np.asarray(w)
    fill = np.asarray(area) / (h * w)
    ncorner = (
        np.asarray(corners_tl, dtype=int)
        + np.asarray(corners_tr, dtype=int)
        + np.asarray(corners_bl, dtype=int)
        + np.asarray(corners_br, dtype=int)
    )
    valid = (h >= MIN_EXTENT) & (w >= MIN_EXTENT) & (h <= MAX_EXTENT) & (w <= MAX_EXTENT)
    near_square = np.abs(h - w) <= 1
    square = (ncorner >= 3) & (fill >= 0.85) & near_square
    triangle = (
        np.asarray(corners_bl, dtype=bool)
        & np.asarray(corners_br, dtype=bool)
        & ~np.asarray(corners_tl, dtype=bool)
        & ~np.asarray(corners_tr, dtype=bool)
        & (bottom >= w - 1)
        & (top <= np.maximum(1, w // 3))
        & (w >= h)
        & (fill >= 0.4)
        & (fill <= 0.75)
    )
    circle = (
        (ncorner <= 1)
        & near_square
        & (fill >= 0.6)
        & (top >= 2)
        & (bottom >= 2)
        & (np.abs(top - bottom) <= 2)
    )
    out = np.full(h.shape, -1, dtype=np.int64)
    out[circle] = _CIRCLE
    out[triangle] = _TRIANGLE
    out[square] = _SQUARE
    out[~valid] = -1
    return out


def detect_batch(tokens) -> ObjectTable:
    """Detect the objects of every grid: tokens long [B, 256] or [B, 16, 16] -> :class:`ObjectTable`.

    Ids outside 0..V-1 count as non-background tokens of an "invalid" colour: they
    form components but are never a shape.
    """
    grids = _grids(tokens)
    grids = np.where((grids < 0) | (grids >= CODEBOOK_SIZE), CODEBOOK_SIZE, grids)
    b, h, w = grids.shape
    hw = h * w
    lab = label(grids)
    fg = lab >= 0
    flat_lab = lab.ravel()
    pix = np.flatnonzero(fg)  # flat indices of foreground tokens, ascending
    reps = pix[flat_lab[pix] == pix]  # one root per component, ascending
    k = len(reps)
    comp = np.full(b * hw, -1, dtype=np.int64)  # flat index of a root -> component number
    comp[reps] = np.arange(k)
    inv = comp[flat_lab[pix]]  # component number of every foreground token
    rows = (pix // w) % h
    cols = pix % w
    area = np.bincount(inv, minlength=k)
    row_c = np.bincount(inv, weights=rows, minlength=k) / np.maximum(area, 1)
    col_c = np.bincount(inv, weights=cols, minlength=k) / np.maximum(area, 1)
    top = np.full(k, h, dtype=np.int64)
    left = np.full(k, w, dtype=np.int64)
    bottom = np.full(k, -1, dtype=np.int64)
    right = np.full(k, -1, dtype=np.int64)
    np.minimum.at(top, inv, rows)
    np.minimum.at(left, inv, cols)
    np.maximum.at(bottom, inv, rows)
    np.maximum.at(right, inv, cols)
    gb = reps // hw
    colour = grids.ravel()[reps]

    def at(r, c):
        return flat_lab[gb * hw + r * w + c] == reps

    top_row = np.bincount(inv, weights=rows == top[inv], minlength=k)
    bottom_row = np.bincount(inv, weights=rows == bottom[inv], minlength=k)
    bh, bw = bottom - top + 1, right - left + 1
    shape = classify(
        bh, bw, area, at(top, left), at(top, right), at(bottom, left), at(bottom, right), top_row, bottom_row
    )
    shape[colour == CODEBOOK_SIZE] = -1  # ids outside the palette are never a shape

    # contact: tokens with an 8-neighbour of another component; isolated: none
    touching = np.zeros(lab.shape, dtype=bool)
    for (la, lb), (ta, tb) in zip(_neighbour_pairs(lab), _neighbour_pairs(touching)):
        meet = (la >= 0) & (lb >= 0) & (la != lb)
        ta |= meet
        tb |= meet
    contact = np.bincount(inv, weights=touching.ravel()[pix], minlength=k).astype(np.int64)
    isolated = contact == 0

    exact = np.zeros(k, dtype=bool)
    for name, _, mask in templates():
        th, tw = mask.shape
        cand = np.flatnonzero((shape == SHAPES.index(name)) & (bh == th) & (bw == tw) & (area == mask.sum()))
        if len(cand) == 0:
            continue
        dr, dc = np.nonzero(mask)
        pos = gb[cand, None] * hw + (top[cand, None] + dr[None]) * w + (left[cand, None] + dc[None])
        exact[cand] = (flat_lab[pos] == reps[cand, None]).all(axis=1)

    return ObjectTable(
        batch=gb,
        colour=colour,
        shape=shape,
        area=area,
        row=row_c,
        col=col_c,
        top=top,
        left=left,
        bottom=bottom,
        right=right,
        clean=exact & isolated,
        isolated=isolated,
        fit=_fits(area, colour, bh, bw, inv, rows - top[inv], cols - left[inv]),
        contact=contact,
        foreground=fg.reshape(b, hw).sum(axis=1),
    )


@cache
def _template_runs() -> tuple[tuple[int, int, int, tuple[tuple[int, int, int], ...]], ...]:
    """Every template as (area, height, width, runs): one (row, first column, width)
    per row, each row of a template being one contiguous run."""
    out = []
    for _, _, mask in templates():
        runs = []
        for r, row in enumerate(mask):
            cs = np.flatnonzero(row)
            if len(cs) != cs[-1] - cs[0] + 1:
                raise ValueError("template rows must be contiguous runs")
            runs.append((r, int(cs[0]), len(cs)))
        out.append((int(mask.sum()), *mask.shape, tuple(runs)))
    return tuple(out)


def template_fit(masks: np.ndarray) -> np.ndarray:
    """Best template IoU of each mask: bool [K, H, W] -> float64 [K].

    max over the world's templates T and over every offset of T (also partly outside
    the frame, so the result does not depend on where the mask sits) of
    |mask ∩ T| / |mask ∪ T|; 0 for an empty mask. The overlap at every offset is a
    sum of one horizontal box sum of the mask per template row.
    """
    masks = np.asarray(masks, dtype=bool)
    k, h, w = masks.shape
    runs = _template_runs()
    th = max(t[1] for t in runs)
    tw = max(t[2] for t in runs)
    # canvas [rows, columns, K] (the masks last, so every slice below is a run of
    # contiguous K-vectors): each mask with th - 1 empty rows and tw - 1 empty columns
    # on each side, plus a leading zero column so that prefix[:, x] = canvas[:, :x].sum(1)
    dtype = np.uint8 if w < 256 else np.int32  # row sums reach w, overlaps the template area
    z = np.zeros((h + 2 * th - 2, w + 2 * tw - 1, k), dtype=dtype)
    z[th - 1 : th - 1 + h, tw : tw + w] = masks.transpose(1, 2, 0)
    prefix = z.cumsum(axis=1, dtype=dtype)
    widths = {n for t in runs for _, _, n in t[3]}
    box = {n: prefix[:, n:] - prefix[:, :-n] for n in widths}  # box[n][:, x] = canvas[:, x:x+n].sum(1)
    area = masks.reshape(k, -1).sum(axis=1)
    best = np.zeros(k)
    for t_area, ht, wt, rows in runs:
        y0, x0, ny, nx = th - ht, tw - wt, h + ht - 1, w + wt - 1
        overlap = np.zeros((ny, nx, k), dtype=dtype)
        for r, c0, n in rows:
            overlap += box[n][y0 + r : y0 + r + ny, x0 + c0 : x0 + c0 + nx]
        ov = overlap.reshape(-1, k).max(axis=0, initial=0).astype(np.int64)
        best = np.maximum(best, ov / (area + t_area - ov))
    return best


@cache
def _fittable_areas() -> np.ndarray:
    """bool [GRID * GRID + 1]: areas a whose IoU with some template area t can exceed
    FIT_THRESHOLD (IoU <= min(a, t) / max(a, t))."""
    a = np.arange(GRID * GRID + 1)[:, None]
    t = np.array([r[0] for r in _template_runs()])
    out = (np.minimum(a, t) > FIT_THRESHOLD * np.maximum(a, t)).any(axis=1)
    out.setflags(write=False)
    return out


def _fits(area, colour, bh, bw, inv, dr, dc) -> np.ndarray:
    """``fit`` of every component [K]: the template IoU when above FIT_THRESHOLD, else 0.

    Only components whose size allows it are fitted (IoU <= min(a, t) / max(a, t) for
    areas a and t); inv, dr, dc: component number and offset in its bbox of every
    foreground token."""
    cand = np.flatnonzero(_fittable_areas()[area] & (colour != CODEBOOK_SIZE))
    fit = np.zeros(len(area))
    if len(cand) == 0:
        return fit
    slot = np.full(len(area), -1, dtype=np.int64)
    slot[cand] = np.arange(len(cand))
    s = slot[inv]
    on = s >= 0
    masks = np.zeros((len(cand), int(bh[cand].max()), int(bw[cand].max())), dtype=bool)
    masks[s[on], dr[on], dc[on]] = True
    iou = template_fit(masks)
    fit[cand] = np.where(iou > FIT_THRESHOLD, iou, 0.0)
    return fit


def find_objects(grid) -> list[DetectedObject]:
    """The objects of one grid (int [16, 16] or [256]), in reading order of their first token."""
    grids = _grids(grid)
    if grids.shape[0] != 1:
        raise ValueError(f"find_objects takes one grid, got {grids.shape[0]}; use detect_batch")
    return detect_batch(grids).objects(0)


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether an object with centroid ``a`` (row, col) is <relation> one with centroid ``b``.

    dx = col_a - col_b, dy = row_a - row_b (rows grow downwards). "left": dx <=
    -RELATION_MARGIN and |dy| <= |dx|; "right": dx >= RELATION_MARGIN and |dy| <= |dx|;
    "above": dy <= -RELATION_MARGIN and |dx| <= |dy|; "below": dy >= RELATION_MARGIN
    and |dx| <= |dy|.
    """
    dy, dx = a[0] - b[0], a[1] - b[1]
    return bool(relation_holds_array(relation, np.asarray(dy), np.asarray(dx)))


def relation_holds_array(relation: str, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """:func:`relation_holds` for arrays of centroid offsets dy, dx (any shape) -> bool array."""
    m = RELATION_MARGIN
    if relation == "left":
        return (dx <= -m) & (np.abs(dy) <= np.abs(dx))
    if relation == "right":
        return (dx >= m) & (np.abs(dy) <= np.abs(dx))
    if relation == "above":
        return (dy <= -m) & (np.abs(dx) <= np.abs(dy))
    if relation == "below":
        return (dy >= m) & (np.abs(dx) <= np.abs(dy))
    raise ValueError(f"unknown relation {relation!r}")
