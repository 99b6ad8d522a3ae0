"""The shapes world: palette, templates, rendering, pictures and prompt/grid pairs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mdmrl_plugins.shapes import world
from mdmrl_plugins.shapes.grammar import FAMILIES, is_heldout, parse
from mdmrl_plugins.shapes.rewards import score, score_batch
from mdmrl_plugins.shapes.world import (
    CODEBOOK_SIZE,
    COLOURS,
    GRID,
    PALETTE,
    SHAPES,
    Scene,
    ShapeSpec,
    render,
    render_rgb,
    sample_pair,
    save_grid_png,
    shape_mask,
)


def test_palette_and_constants():
    assert GRID == 16
    assert COLOURS[0] == "background"
    assert len(COLOURS) == len(set(COLOURS)) == CODEBOOK_SIZE
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (CODEBOOK_SIZE, 3)
    assert len({tuple(c) for c in PALETTE}) == CODEBOOK_SIZE  # every colour is distinct
    assert {"square", "circle", "triangle"} <= set(SHAPES)


def test_templates_are_distinct_connected_and_fit():
    seen = set()
    for shape, size, mask in world.templates():
        h, w = mask.shape
        assert 3 <= h <= GRID and 3 <= w <= GRID
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()  # tight bbox
        key = (mask.shape, mask.tobytes())
        assert key not in seen, (shape, size)
        seen.add(key)
    # sizes grow
    for shape in SHAPES:
        areas = [shape_mask(shape, z).sum() for z in world.SIZES]
        assert areas == sorted(areas) and len(set(areas)) == len(areas)
    with pytest.raises(ValueError):
        shape_mask("hexagon", 0)


def test_render_places_templates_at_their_corner():
    scene = Scene((ShapeSpec("square", "red", 0, 1, 2), ShapeSpec("triangle", "blue", 1, 8, 5)))
    grid = render(scene)
    assert grid.dtype == np.int64 and grid.shape == (GRID, GRID)
    assert (grid[1:4, 2:5] == COLOURS.index("red")).all()
    assert grid[8, 8] == COLOURS.index("blue") and grid[8, 7] == 0  # apex of a height-4 triangle
    assert (grid[11, 5:12] == COLOURS.index("blue")).all()  # base of width 7
    assert (grid != 0).sum() == 9 + 16
    assert scene.objects[0].centroid == (2.0, 3.0)


def test_render_rejects_shapes_off_the_grid_and_bad_names():
    with pytest.raises(ValueError):
        render(Scene((ShapeSpec("square", "red", 2, 12, 0),)))
    with pytest.raises(ValueError):
        ShapeSpec("square", "background", 0, 0, 0)
    with pytest.raises(ValueError):
        ShapeSpec("star", "red", 0, 0, 0)


def test_render_rgb_layouts_scale_and_mask_token():
    grid = render(Scene((ShapeSpec("circle", "yellow", 2, 3, 4),)))
    flat = torch.from_numpy(grid).reshape(1, -1)
    a = render_rgb(flat, scale=4)
    b = render_rgb(torch.from_numpy(grid)[None], scale=4)
    assert a.dtype == torch.float32 and a.shape == (1, 3, 64, 64)
    assert torch.equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0
    r, c = 5, 6  # a yellow token -> a 4x4 block of the palette colour
    block = a[0, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4]
    expected = torch.tensor(PALETTE[COLOURS.index("yellow")], dtype=torch.float32) / 255
    assert torch.allclose(block, expected[:, None, None].expand_as(block))
    assert torch.all(a[0, :, 0, 0] == 0)  # background is black
    masked = flat.clone()
    masked[0, 0] = CODEBOOK_SIZE  # a mask id shows as grey
    assert torch.allclose(render_rgb(masked, scale=1)[0, :, 0, 0], torch.full((3,), 128 / 255))
    assert render_rgb(torch.zeros(3, 256, dtype=torch.long)).shape == (3, 3, 128, 128)


def test_save_grid_png_writes_a_labelled_sheet(tmp_path):
    rng = np.random.default_rng(0)
    pairs = [sample_pair(rng, "train") for _ in range(5)]
    tokens = torch.from_numpy(np.stack([g for _, g in pairs]))
    out = save_grid_png(tokens, [p for p, _ in pairs], tmp_path / "sub" / "grid.png", columns=3)
    img = Image.open(out)
    assert img.size[0] >= 3 * 128 and img.size[1] >= 2 * 128
    arr = np.asarray(img.convert("RGB"))
    # the first cell's picture is the rendered grid
    first = (render_rgb(tokens[:1])[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert any(
        np.array_equal(arr[y : y + 128, x : x + 128], first) for y in range(0, 12) for x in range(0, 12)
    )
    # captions are drawn: dark pixels below the first picture (background is white there)
    assert (arr[140:160, :128] < 100).any()
    with pytest.raises(ValueError):
        save_grid_png(tokens, ["only one prompt"], tmp_path / "bad.png")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    split=st.sampled_from(["train", "heldout"]),
    family=st.sampled_from(FAMILIES),
)
def test_sample_pair_grids_satisfy_their_prompt_fully(seed, split, family):
    rng = np.random.default_rng(seed)
    prompt, grid = sample_pair(rng, split, family)
    req = parse(prompt)
    assert req.family == family
    assert is_heldout(req) == (split == "heldout")
    assert grid.shape == (GRID, GRID) and grid.dtype == np.int64
    detail = score(prompt, grid)
    assert (detail.alignment, detail.quality) == (1.0, 1.0), detail
    # the scene shows exactly the objects the prompt names (1-4 shapes, no distractors)
    assert len(detail.objects) == sum(p.count for p in req.objects)
    assert 1 <= len(detail.objects) <= 4


def test_sample_pair_many_samples_score_one_and_are_family_balanced():
    rng = np.random.default_rng(7)
    pairs = [sample_pair(rng, "train") for _ in range(600)]
    prompts = [p for p, _ in pairs]
    alignment, quality = score_batch(prompts, np.stack([g for _, g in pairs]))
    assert alignment.min() == 1.0 and quality.min() == 1.0
    families = Counter(parse(p).family for p in prompts)
    assert set(families) == set(FAMILIES)
    assert min(families.values()) > 600 / 6 * 0.7  # uniform over families


def test_sample_pair_is_reproducible():
    a = sample_pair(np.random.default_rng(3), "heldout")
    b = sample_pair(np.random.default_rng(3), "heldout")
    assert a[0] == b[0] and np.array_equal(a[1], b[1])


def test_sample_pair_verify_flag_scores_the_grid():
    prompt, grid = sample_pair(np.random.default_rng(1), "train", verify=True)
    assert score(prompt, grid).alignment == 1.0


def test_random_scene_shapes_do_not_touch():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = world.random_scene(rng)
        assert 1 <= len(scene.objects) <= 4
        grid = render(scene)
        assert (grid != 0).sum() == sum(int(o.mask.sum()) for o in scene.objects)  # no overlap
