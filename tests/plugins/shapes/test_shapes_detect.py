"""Detectors of the shapes world on hand-built grids and random scenes."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mdmrl_plugins.shapes import detect, world
from mdmrl_plugins.shapes.detect import detect_batch, find_objects, relation_holds
from mdmrl_plugins.shapes.world import COLOURS, GRID, SHAPES, Scene, ShapeSpec, render

RED, GREEN, BLUE = (COLOURS.index(c) for c in ("red", "green", "blue"))


def put(grid: np.ndarray, shape: str, size: int, row: int, col: int, colour: int) -> np.ndarray:
    mask = world.shape_mask(shape, size)
    grid[row : row + mask.shape[0], col : col + mask.shape[1]][mask] = colour
    return grid


def blank() -> np.ndarray:
    return np.zeros((GRID, GRID), dtype=np.int64)


def reference_components(grid: np.ndarray) -> list[set[tuple[int, int]]]:
    """Breadth-first search over 8-neighbours of the same non-zero colour."""
    seen = np.zeros_like(grid, dtype=bool)
    comps = []
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            if grid[r, c] == 0 or seen[r, c]:
                continue
            comp, queue = set(), deque([(r, c)])
            seen[r, c] = True
            while queue:
                y, x = queue.popleft()
                comp.add((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v, u = y + dy, x + dx
                        if 0 <= v < grid.shape[0] and 0 <= u < grid.shape[1] and not seen[v, u]:
                            if grid[v, u] == grid[y, x]:
                                seen[v, u] = True
                                queue.append((v, u))
            comps.append(comp)
    return comps


@settings(max_examples=25, deadline=None)
@given(grids=arrays(np.int64, (3, GRID, GRID), elements=st.integers(0, 2)))
def test_labels_match_a_breadth_first_search(grids):
    lab = detect.label(grids)
    for b in range(3):
        expected = {frozenset(c) for c in reference_components(grids[b])}
        got = {}
        for r in range(GRID):
            for c in range(GRID):
                if lab[b, r, c] >= 0:
                    got.setdefault(lab[b, r, c], set()).add((r, c))
        assert {frozenset(c) for c in got.values()} == expected
        assert (lab[b] >= 0).sum() == (grids[b] != 0).sum()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", world.SIZES)
def test_every_template_is_detected_exactly(shape, size):
    grid = put(blank(), shape, size, 3, 2, GREEN)
    (obj,) = find_objects(grid)
    mask = world.shape_mask(shape, size)
    rr, cc = np.nonzero(mask)
    assert obj.shape == shape
    assert obj.colour == "green" and obj.colour_id == GREEN
    assert obj.size == mask.sum()
    assert obj.bbox == (3, 2, 3 + mask.shape[0] - 1, 2 + mask.shape[1] - 1)
    assert obj.centroid == pytest.approx((3 + rr.mean(), 2 + cc.mean()))
    assert obj.clean and obj.isolated


def test_exact_counts_and_positions_in_a_hand_built_grid():
    grid = blank()
    put(grid, "circle", 0, 0, 0, RED)
    put(grid, "circle", 0, 0, 6, RED)
    put(grid, "circle", 0, 0, 12, BLUE)
    put(grid, "triangle", 1, 9, 1, GREEN)
    objs = find_objects(grid)
    assert [o.shape for o in objs] == ["circle", "circle", "circle", "triangle"]
    assert [o.colour for o in objs] == ["red", "red", "blue", "green"]
    assert [o.centroid for o in objs][:3] == [(1.5, 1.5), (1.5, 7.5), (1.5, 13.5)]
    assert all(o.clean for o in objs)


def test_touching_shapes_of_one_colour_merge_into_one_unclassified_object():
    grid = put(put(blank(), "square", 1, 2, 2, RED), "square", 1, 2, 6, RED)
    (obj,) = find_objects(grid)
    assert obj.size == 32 and obj.shape is None and not obj.clean


def test_corner_contact_joins_under_8_connectivity():
    grid = put(put(blank(), "square", 0, 0, 0, RED), "square", 0, 3, 3, RED)
    (obj,) = find_objects(grid)
    assert obj.size == 18 and obj.shape is None


def test_touching_shapes_of_different_colours_are_found_but_not_clean():
    grid = put(put(blank(), "square", 1, 2, 2, RED), "square", 1, 2, 6, BLUE)
    objs = find_objects(grid)
    assert [o.shape for o in objs] == ["square", "square"]
    assert not any(o.clean or o.isolated for o in objs)


def test_stray_tokens_are_objects_without_a_shape():
    grid = put(blank(), "square", 1, 2, 2, RED)
    grid[12, 12] = BLUE
    square, stray = find_objects(grid)
    assert square.shape == "square" and square.clean
    assert stray.shape is None and stray.size == 1 and not stray.clean
    grid[2, 6] = RED  # a stray token glued to the square joins it: still square-like, no longer clean
    objs = find_objects(grid)
    assert objs[0].size == 17 and objs[0].shape == "square" and not objs[0].clean
    grid[3, 6:9] = RED  # a longer growth makes it a blob
    assert find_objects(grid)[0].shape is None


def test_near_miss_shapes_keep_their_class_but_are_not_clean():
    grid = put(blank(), "square", 2, 4, 4, RED)
    grid[4, 4] = 0  # one corner missing
    (obj,) = find_objects(grid)
    assert obj.shape == "square" and not obj.clean
    grid = put(blank(), "circle", 2, 4, 4, RED)
    grid[6, 4] = 0  # a dent in the outline
    (obj,) = find_objects(grid)
    assert obj.shape == "circle" and not obj.clean


def test_shapes_are_told_apart():
    # a square of side 4 and a circle of diameter 4 differ only in their corners
    sq = find_objects(put(blank(), "square", 1, 0, 0, RED))[0]
    ci = find_objects(put(blank(), "circle", 0, 0, 0, RED))[0]
    assert (sq.shape, ci.shape) == ("square", "circle")
    # an upside-down triangle is not a triangle, a long bar is nothing
    grid = put(blank(), "triangle", 1, 2, 2, RED)
    assert find_objects(np.flipud(grid).copy())[0].shape is None
    bar = blank()
    bar[5, 1:9] = RED
    assert find_objects(bar)[0].shape is None


@pytest.mark.parametrize("colour", range(len(COLOURS)))
def test_constant_grids_hold_no_shape(colour):
    objs = find_objects(np.full((GRID, GRID), colour))
    assert all(o.shape is None for o in objs)
    assert len(objs) == (0 if colour == 0 else 1)


def test_ids_outside_the_palette_are_invalid_tokens():
    grid = blank()
    grid[2:5, 2:5] = len(COLOURS) + 3  # a 3x3 block of an unknown id
    (obj,) = find_objects(grid)
    assert obj.colour == "invalid" and obj.shape is None and not obj.clean


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_detected_objects_match_any_scene_whose_shapes_do_not_touch(seed):
    scene = world.random_scene(np.random.default_rng(seed))
    objs = find_objects(render(scene))
    got = sorted((o.shape, o.colour, o.bbox, o.size) for o in objs)
    want = sorted(
        (
            s.shape,
            s.colour,
            (s.row, s.col, s.row + s.extent[0] - 1, s.col + s.extent[1] - 1),
            int(s.mask.sum()),
        )
        for s in scene.objects
    )
    assert got == want
    assert all(o.clean for o in objs)
    centroids = sorted(o.centroid for o in objs)
    assert centroids == pytest.approx(sorted(s.centroid for s in scene.objects))


def test_batch_detection_keeps_grids_apart():
    a = put(blank(), "square", 0, 0, 0, RED)
    b = put(blank(), "triangle", 0, 5, 5, BLUE)
    table = detect_batch(np.stack([a, blank(), b]).reshape(3, -1))
    assert table.batch.tolist() == [0, 2]
    assert table.foreground.tolist() == [9, 0, 9]
    assert [o.shape for o in table.objects(2)] == ["triangle"]
    assert table.objects(1) == []
    with pytest.raises(ValueError):
        detect_batch(np.zeros((2, 10)))


def test_relation_rule():
    assert relation_holds("left", (5.0, 2.0), (5.0, 9.0))
    assert not relation_holds("right", (5.0, 2.0), (5.0, 9.0))
    assert relation_holds("above", (1.0, 5.0), (9.0, 6.0))
    assert relation_holds("below", (9.0, 6.0), (1.0, 5.0))
    assert not relation_holds("left", (5.0, 8.0), (5.0, 9.0))  # closer than the margin
    assert not relation_holds("left", (1.0, 5.0), (9.0, 7.0))  # mostly above, not left
    assert relation_holds("left", (1.0, 1.0), (5.0, 5.0)) and relation_holds("above", (1.0, 1.0), (5.0, 5.0))


def test_scene_helpers_agree_with_the_detector():
    scene = Scene((ShapeSpec("triangle", "white", 2, 0, 0),))
    (obj,) = find_objects(render(scene))
    assert obj.centroid == pytest.approx(scene.objects[0].centroid)


def reference_fit(mask: np.ndarray) -> float:
    """Best IoU of a mask with any template at any offset, by trying every offset."""
    area, best = mask.sum(), 0.0
    h, w = mask.shape
    for _, _, tmpl in world.templates():
        th, tw = tmpl.shape
        for dy in range(-th + 1, h):
            for dx in range(-tw + 1, w):
                canvas = np.zeros((h + 2 * th, w + 2 * tw), dtype=bool)
                canvas[th + dy : 2 * th + dy, tw + dx : 2 * tw + dx] = tmpl
                overlap = (canvas[th : th + h, tw : tw + w] & mask).sum()
                best = max(best, overlap / (area + tmpl.sum() - overlap))
    return best


@settings(max_examples=15, deadline=None)
@given(masks=arrays(bool, (4, 7, 9)))
def test_template_fit_matches_trying_every_offset(masks):
    got = detect.template_fit(masks)
    assert got == pytest.approx([reference_fit(m) for m in masks])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", world.SIZES)
def test_template_fit_is_one_for_every_template_even_cut_by_the_frame(shape, size):
    mask = world.shape_mask(shape, size)
    assert detect.template_fit(mask[None]).tolist() == [1.0]
    frame = np.zeros((1, 12, 12), dtype=bool)
    frame[0, 2 : 2 + mask.shape[0], 1 : 1 + mask.shape[1]] = mask
    assert detect.template_fit(frame).tolist() == [1.0]
    # half of the template outside a frame: IoU = what is left / the template
    cut = mask[:, : mask.shape[1] // 2 + 1]
    assert detect.template_fit(cut[None])[0] >= cut.sum() / mask.sum()


def test_fit_and_contact_of_detected_objects():
    grid = put(put(blank(), "square", 1, 2, 2, RED), "square", 1, 2, 6, BLUE)  # side by side
    grid[12, 12] = GREEN  # a stray token: too small to fit anything
    grown = put(blank(), "circle", 1, 5, 5, RED)
    grown[4, 7] = RED  # one token on top of a medium circle: IoU 21 / 22
    a, b, stray = find_objects(grid)
    assert (a.fit, a.contact, b.fit, b.contact) == (1.0, 4, 1.0, 4)
    assert (stray.fit, stray.contact, stray.isolated) == (0.0, 0, True)
    (obj,) = find_objects(grown)
    assert obj.fit == pytest.approx(21 / 22) and obj.contact == 0
    blob = blank()
    blob[2:4, 2:4] = RED  # best IoU 4/9: at or below FIT_THRESHOLD, reported as 0
    assert find_objects(blob)[0].fit == 0.0
    invalid = put(blank(), "square", 1, 2, 2, len(COLOURS) + 1)
    assert find_objects(invalid)[0].fit == 0.0
