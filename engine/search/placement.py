"""Where in a result slide a region query lies.

On features: the region's tile grid is placed on the slide's tile grid (engine's tiles
and their vectors), which gives a coarse place, a tile or so. On pixels: when the region is
a copy of part of the slide, its pixels are registered on the slide (engine.search.localise),
which pins the box to a pixel or two."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from engine.encoder import l2_normalise
from engine.errors import SlideError
from engine.search.localise import RegionQuery, register_region
from engine.search.results import MAX_REGIONS, Region, SlideHit

LOG = logging.getLogger(__name__)

# the 8 symmetries of the square: a region may come rotated or mirrored
_D8 = [
    (1, 0, 0, 1),
    (0, -1, 1, 0),
    (-1, 0, 0, -1),
    (0, 1, -1, 0),
    (-1, 0, 0, 1),
    (0, 1, 1, 0),
    (1, 0, 0, -1),
    (0, -1, -1, 0),
]


def place_on_features(
    xq: np.ndarray, q_cells: np.ndarray, xs: np.ndarray, s_cells: np.ndarray, anchors_per_tile: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Where a multi-tile region lies in one slide: the placement of the query's tile grid
    on the slide's tile grid (any of the 8 rotations/mirrorings, any shift) that maximises
    the mean similarity of query tiles to the slide tiles under them.

    xq: nq x d query tiles, q_cells: nq x 2 their grid cells; xs: n x d slide tiles,
    s_cells: n x 2 their grid cells. Similarities are taken after removing the slide's mean
    vector, so what all tiles of the slide share does not drown what tells them apart.
    Shifts tried: those that put some query tile on one of its `anchors_per_tile` best slide
    tiles. Returns (slide tile index or -1 per query tile, similarity per query tile)."""
    mean = xs.mean(axis=0)
    S = l2_normalise(xq - mean) @ l2_normalise(xs - mean).T  # nq x n
    lookup = {(int(c[0]), int(c[1])): t for t, c in enumerate(s_cells)}
    top = np.argsort(-S, axis=1)[:, :anchors_per_tile]
    best_val, best_pick = -np.inf, None
    for a, b, c, d in _D8:
        placed = np.stack([a * q_cells[:, 0] + b * q_cells[:, 1], c * q_cells[:, 0] + d * q_cells[:, 1]], axis=1)
        shifts = {tuple(s_cells[t] - placed[q]) for q in range(len(xq)) for t in top[q]}
        for dx, dy in shifts:
            pick = np.array([lookup.get((int(px + dx), int(py + dy)), -1) for px, py in placed])
            sims = np.where(pick >= 0, S[np.arange(len(xq)), np.maximum(pick, 0)], -1.0)
            if sims.mean() > best_val:
                best_val, best_pick = sims.mean(), pick
    sims = np.where(best_pick >= 0, S[np.arange(len(xq)), np.maximum(best_pick, 0)], -1.0)
    return best_pick, sims


def placed_regions(
    xq: np.ndarray,
    q_cells: np.ndarray,
    tile_ids: np.ndarray,
    boxes: np.ndarray,
    vectors: Callable[[np.ndarray], np.ndarray],
) -> list[Region]:
    """The region's tiles placed on a slide whose tiles have ids `tile_ids` and level-0
    `boxes` (n x 3: x, y, size), their vectors read by `vectors(ids)` (the index's), as
    boxes scored by cosine similarity, best first."""
    if not len(tile_ids):
        return []
    xs = vectors(tile_ids)
    cells = np.stack([boxes[:, 0] // boxes[:, 2], boxes[:, 1] // boxes[:, 2]], axis=1)
    pick, _ = place_on_features(xq, q_cells, xs, cells)
    regions = [
        Region(int(boxes[t, 0]), int(boxes[t, 1]), int(boxes[t, 2]), int(boxes[t, 2]), float(xq[q] @ xs[t]))
        for q, t in enumerate(pick)
        if t >= 0
    ]
    return sorted(regions, key=lambda r: -r.score)[:MAX_REGIONS]


def pixel_match(slide_info: dict, region: RegionQuery, slide_mpp: float, views) -> Region | None:
    """The box of the slide (`slide_info`: id, path) whose pixels the region is a copy of,
    as a Region with match "pixels", or None. `views`: the engine.search.localise view
    cache. A slide that cannot be opened or read gives None: search results must not fail
    because one file is unreachable."""
    import openslide

    from engine.slides import open_slide

    path = slide_info["path"]
    try:
        slide = open_slide(path)
    except SlideError as exc:
        LOG.debug("no pixel match for slide %s: %s", slide_info["id"], exc)
        return None
    try:
        placed = register_region(slide, slide_mpp, region, views=views, path=path)
    except (openslide.OpenSlideError, OSError, SlideError) as exc:
        LOG.debug("no pixel match for slide %s: cannot read %s: %s", slide_info["id"], path, exc)
        return None
    finally:
        slide.close()
    if placed is None:
        return None
    return Region(placed.x, placed.y, placed.w, placed.h, placed.ncc, match="pixels")


def pin_on_pixels(hit: SlideHit, region: RegionQuery, slide_mpp: float, views) -> None:
    """When the region's pixels are a copy of part of the hit's slide, put that box first
    in its regions (features find the slide and a coarse place, registration pins the box)."""
    found = pixel_match(hit.slide, region, slide_mpp, views)
    if found is not None:
        hit.regions = [found, *hit.regions][:MAX_REGIONS]
