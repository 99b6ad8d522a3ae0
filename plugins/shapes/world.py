"""The shapes world: a procedural text-to-image world on a 16 x 16 token grid.

Every token is a palette colour id (0 = background). A :class:`Scene` holds 1-4
filled shapes (:data:`SHAPES`) of the colours in :data:`COLOURS`, each in one of
three sizes, drawn from fixed pixel templates (:func:`shape_mask`).
:func:`sample_pair` draws a prompt from the grammar (:mod:`.grammar`) and a grid that
satisfies it exactly; :func:`render_rgb` and :func:`save_grid_png` turn grids into
pictures. See docs/shapes-world.md.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch

#: Side of the square token grid; N = GRID * GRID = 256 tokens.
GRID = 16

#: Colour names; the index is the token id. Index 0 is the background.
COLOURS: tuple[str, ...] = ("background", "red", "green", "blue", "yellow", "purple", "orange", "white")

#: RGB of each token id, uint8 [V, 3].
PALETTE: np.ndarray = np.array(
    [
        (0, 0, 0),  # background
        (230, 40, 40),  # red
        (40, 190, 60),  # green
        (40, 90, 235),  # blue
        (245, 215, 40),  # yellow
        (150, 60, 200),  # purple
        (245, 140, 30),  # orange
        (245, 245, 245),  # white
    ],
    dtype=np.uint8,
)
PALETTE.setflags(write=False)

#: V, the number of token ids of the world (background included).
CODEBOOK_SIZE = len(PALETTE)

#: Colour shown by :func:`render_rgb` for ids outside 0..V-1 (e.g. a mask token).
UNKNOWN_RGB = (128, 128, 128)

#: Shape classes, in the order the detectors number them.
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")

#: Size levels of a shape: 0 small, 1 medium, 2 large.
SIZES: tuple[int, ...] = (0, 1, 2)

# Row widths (top to bottom) of every template, centred in its bounding box.
#   square:   side 3, 4, 5 (filled)
#   circle:   diameter 4, 5, 6 (corners cut; an octagon at 6)
#   triangle: height 3, 4, 5, pointing up, base 2 * height - 1
_PROFILES: dict[tuple[str, int], tuple[int, ...]] = {
    ("square", 0): (3, 3, 3),
    ("square", 1): (4, 4, 4, 4),
    ("square", 2): (5, 5, 5, 5, 5),
    ("circle", 0): (2, 4, 4, 2),
    ("circle", 1): (3, 5, 5, 5, 3),
    ("circle", 2): (2, 4, 6, 6, 4, 2),
    ("triangle", 0): (1, 3, 5),
    ("triangle", 1): (1, 3, 5, 7),
    ("triangle", 2): (1, 3, 5, 7, 9),
}


@cache
def _mask(shape: str, size: int) -> np.ndarray:
    widths = _PROFILES[(shape, size)]
    w = max(widths)
    m = np.zeros((len(widths), w), dtype=bool)
    for r, rw in enumerate(widths):
        left = (w - rw) // 2
        m[r, left : left + rw] = True
    m.setflags(write=False)
    return m


def shape_mask(shape: str, size: int) -> np.ndarray:
    """The template of ``shape`` at size level ``size``: bool [h, w] (read-only)."""
    if (shape, size) not in _PROFILES:
        raise ValueError(f"no template for shape {shape!r} at size {size}; shapes: {SHAPES}, sizes: {SIZES}")
    return _mask(shape, size)


def templates() -> list[tuple[str, int, np.ndarray]]:
    """Every (shape, size, mask) template of the world."""
    return [(s, z, _mask(s, z)) for s in SHAPES for z in SIZES]


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene.

    shape: one of :data:`SHAPES`; colour: one of ``COLOURS[1:]``; size: a level in
    :data:`SIZES`; row, col: top-left corner of the template's bounding box.
    """

    shape: str
    colour: str
    size: int
    row: int
    col: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; shapes: {', '.join(SHAPES)}")
        if self.colour not in COLOURS[1:]:
            raise ValueError(f"unknown colour {self.colour!r}; colours: {', '.join(COLOURS[1:])}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")

    @property
    def mask(self) -> np.ndarray:
        return _mask(self.shape, self.size)

    @property
    def extent(self) -> tuple[int, int]:
        """(height, width) of the bounding box."""
        h, w = self.mask.shape
        return int(h), int(w)

    @property
    def centroid(self) -> tuple[float, float]:
        """(row, col) mean of the shape's pixels on the grid."""
        rr, cc = np.nonzero(self.mask)
        return float(self.row + rr.mean()), float(self.col + cc.mean())


@dataclass(frozen=True)
class Scene:
    """Shapes drawn in order onto a background grid (later shapes on top)."""

    objects: tuple[ShapeSpec, ...] = field(default_factory=tuple)


def render(scene: Scene) -> np.ndarray:
    """Draw a scene: int64 [GRID, GRID] of token ids. A shape outside the grid is a ValueError."""
    grid = np.zeros((GRID, GRID), dtype=np.int64)
    for obj in scene.objects:
        h, w = obj.extent
        if obj.row < 0 or obj.col < 0 or obj.row + h > GRID or obj.col + w > GRID:
            raise ValueError(f"{obj} does not fit on the {GRID}x{GRID} grid")
        window = grid[obj.row : obj.row + h, obj.col : obj.col + w]
        window[obj.mask] = COLOURS.index(obj.colour)
    return grid


def _as_grids(tokens) -> torch.Tensor:
    """long [B, 256] / [B, 16, 16] / [16, 16] (tensor or array) -> long [B, 16, 16]."""
    t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
    t = t.detach().to("cpu", torch.long)
    if t.dim() == 2 and t.shape == (GRID, GRID):
        t = t[None]
    elif t.dim() == 2 and t.shape[1] == GRID * GRID:
        t = t.reshape(-1, GRID, GRID)
    elif t.dim() == 1 and t.shape[0] == GRID * GRID:
        t = t.reshape(1, GRID, GRID)
    elif not (t.dim() == 3 and t.shape[1:] == (GRID, GRID)):
        raise ValueError(
            f"expected token grids [B, {GRID * GRID}] or [B, {GRID}, {GRID}], got {tuple(t.shape)}"
        )
    return t


def render_rgb(tokens, scale: int = 8) -> torch.Tensor:
    """Token grids -> images float32 [B, 3, 16*scale, 16*scale] in [0, 1].

    tokens: long [B, 256] or [B, 16, 16] (a single [16, 16] grid is also accepted).
    Every token becomes a ``scale`` x ``scale`` block of its palette colour; ids
    outside 0..V-1 (a mask token) show as mid grey.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    grids = _as_grids(tokens)
    palette = torch.cat(
        [torch.from_numpy(PALETTE.astype(np.float32)), torch.tensor([UNKNOWN_RGB], dtype=torch.float32)]
    )
    palette = palette / 255.0
    ids = torch.where((grids < 0) | (grids >= CODEBOOK_SIZE), CODEBOOK_SIZE, grids)
    img = palette[ids].permute(0, 3, 1, 2)  # [B, 3, 16, 16]
    if scale > 1:
        img = img.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return img.contiguous()


def save_grid_png(tokens, prompts: list[str], path, columns: int | None = None, scale: int = 8) -> Path:
    """Write a labelled picture of B token grids (tokens long [B, 256] or [B, 16, 16]),
    each captioned with its prompt, ``columns`` per row (default min(B, 8)). Returns the path."""
    from PIL import Image, ImageDraw, ImageFont

    images = render_rgb(tokens, scale=scale)
    b = images.shape[0]
    if len(prompts) != b:
        raise ValueError(f"got {b} grids but {len(prompts)} prompts")
    cols = max(1, min(columns or 8, b))
    rows = (b + cols - 1) // cols
    side = GRID * scale
    pad = 6
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    chars = max(8, side // 6)
    captions = [textwrap.wrap(p, chars)[:3] or [""] for p in prompts]
    line_h = 13
    caption_h = line_h * max(len(c) for c in captions) + 4
    cell_w, cell_h = side + 2 * pad, side + caption_h + 2 * pad
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(b):
        x0, y0 = (i % cols) * cell_w + pad, (i // cols) * cell_h + pad
        sheet.paste(Image.fromarray(arr[i]), (x0, y0))
        for k, line in enumerate(captions[i]):
            draw.text((x0, y0 + side + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


# -- scenes that satisfy a prompt ---------------------------------------------------------


@cache
def _halo(shape: str, size: int) -> np.ndarray:
    """The template grown by one token in all 8 directions: bool [h + 2, w + 2]."""
    m = _mask(shape, size)
    h, w = m.shape
    out = np.zeros((h + 2, w + 2), dtype=bool)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            out[dr : dr + h, dc : dc + w] |= m
    out.setflags(write=False)
    return out


def _place(
    specs: list[tuple[str, str, int]], rng: np.random.Generator, tries: int = 60
) -> list[ShapeSpec] | None:
    """Put shapes at random positions, each at least one background token (in all 8
    directions) away from the others. None when one cannot be placed."""
    # taken[1 + r, 1 + c]: grid token (r, c) is a shape or next to one (1-token border)
    taken = np.zeros((GRID + 2, GRID + 2), dtype=bool)
    placed: list[ShapeSpec] = []
    for shape, colour, size in specs:
        mask = _mask(shape, size)
        h, w = mask.shape
        for _ in range(tries):
            r = int(rng.integers(0, GRID - h + 1))
            c = int(rng.integers(0, GRID - w + 1))
            if not taken[r + 1 : r + 1 + h, c + 1 : c + 1 + w][mask].any():
                break
        else:
            return None
        placed.append(ShapeSpec(shape, colour, size, r, c))
        taken[r : r + h + 2, c : c + w + 2] |= _halo(shape, size)
    return placed


def random_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """A scene of ``num_objects`` (default: 1-4 at random) shapes of random class,
    colour and size, no two touching (not even at a corner)."""
    n = int(rng.integers(1, 5)) if num_objects is None else num_objects
    if not 1 <= n <= 4:
        raise ValueError(f"num_objects must be 1-4, got {n}")
    sizes = SIZES if n <= 2 else SIZES[:2]
    for _ in range(200):
        specs = [
            (
                SHAPES[int(rng.integers(len(SHAPES)))],
                COLOURS[int(rng.integers(1, len(COLOURS)))],
                int(sizes[int(rng.integers(len(sizes)))]),
            )
            for _ in range(n)
        ]
        placed = _place(specs, rng)
        if placed is not None:
            return Scene(tuple(placed))
    raise RuntimeError(f"could not lay out {n} shapes")


def scene_for(requirements, rng: np.random.Generator, attempts: int = 200) -> Scene:
    """A scene showing exactly the objects a parsed prompt asks for.

    Unnamed colours are drawn at random; sizes are drawn at random (the two smaller
    levels when the scene has 3 or more shapes); positions are drawn until the shapes
    do not touch and the prompt's relation holds (:func:`.detect.relation_holds`).
    """
    from mdmrl_plugins.shapes.detect import relation_holds

    colours = COLOURS[1:]
    total = sum(p.count for p in requirements.objects)
    sizes = SIZES if total <= 2 else SIZES[:2]
    for _ in range(attempts):
        specs: list[tuple[str, str, int]] = []
        for p in requirements.objects:
            for _ in range(p.count):
                colour = p.colour or colours[int(rng.integers(len(colours)))]
                specs.append((p.shape, colour, int(sizes[int(rng.integers(len(sizes)))])))
        order = rng.permutation(len(specs))  # place in random order so no phrase is favoured
        placed = _place([specs[i] for i in order], rng)
        if placed is None:
            continue
        objects = [None] * len(specs)
        for k, i in enumerate(order):
            objects[i] = placed[k]
        if requirements.relation is not None:
            a, b = objects[0], objects[1]
            if not relation_holds(requirements.relation, a.centroid, b.centroid):
                continue
        return Scene(tuple(objects))
    raise RuntimeError(f"could not lay out a scene for {requirements.text()!r} in {attempts} attempts")


def sample_pair(
    rng: np.random.Generator, split: str, family: str | None = None, verify: bool = False
) -> tuple[str, np.ndarray]:
    """A prompt from ``split`` ("train" or "heldout") and a grid int64 [16, 16] that
    satisfies it fully (alignment 1 and quality 1).

    Families are drawn uniformly unless ``family`` is given. Grids are exact by
    construction (templates, one free token around each shape, the relation checked
    with the reward's own rule); ``verify`` also scores each grid with
    :func:`.rewards.score` (three times slower) and raises if it is not 1/1.
    """
    from mdmrl_plugins.shapes.grammar import parse, sample_prompt

    prompt = sample_prompt(rng, split, family)
    grid = render(scene_for(parse(prompt), rng))
    if verify:
        from mdmrl_plugins.shapes.rewards import score

        detail = score(prompt, grid)
        if detail.alignment != 1.0 or detail.quality != 1.0:
            raise RuntimeError(f"sample_pair drew a grid for {prompt!r} that scores {detail}")
    return prompt, grid
