"""From query tiles to ranked slides: search the index, growing k until enough slides
are found, group the neighbour tiles by slide and score each slide.

A query tile that does not retrieve any tile of a slide counts with the lowest similarity it
did retrieve (its k-th neighbour), an upper bound of its true best match in that slide;
k grows until `top_k` slides are found or every allowed tile was retrieved."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.catalog.db import Catalog
from engine.errors import QueryError
from engine.index import IdFilter
from engine.search.live_index import LiveIndex
from engine.search.lookups import tile_rows
from engine.search.results import MAX_REGIONS, Region


def check_top_k(top_k: int) -> None:
    if not (isinstance(top_k, (int, np.integer)) and top_k >= 1):
        raise QueryError(f"top_k must be a whole number of at least 1, not {top_k!r}")


def slide_scores(sims: np.ndarray, slide_of: np.ndarray, floor: np.ndarray, rule: str) -> dict[int, float]:
    """Aggregate per-query-tile best similarities into one score per slide.

    sims: nq x n similarities of candidate tiles (-inf: none), slide_of: their slides (same
    shape, -1: none), floor: per query tile, the similarity a slide gets when the tile
    retrieved none of it; rule: 'mean' (region queries) or 'median' (slide queries)."""
    ok = (slide_of >= 0) & np.isfinite(sims)
    if not ok.any():
        return {}
    q = np.nonzero(ok)[0]
    slides, col = np.unique(slide_of[ok], return_inverse=True)
    best = np.repeat(floor.astype(np.float64)[:, None], len(slides), axis=1)  # nq x n_slides
    vals = sims[ok].astype(np.float64)
    # best similarity per (query tile, slide): sort by value, the last write wins
    order = np.argsort(vals, kind="stable")
    best[q[order], col[order]] = vals[order]
    score = best.mean(axis=0) if rule == "mean" else np.median(best, axis=0)
    return {int(s): float(v) for s, v in zip(slides, score)}


@dataclasses.dataclass
class Neighbours:
    """The index's answer for nq query tiles: similarities D and tile ids I (nq x k; -inf
    and -1 where none), the slide of each (-1: none, or no longer in the catalog), and
    tile id -> (slide id, x, y, size) of those in the catalog."""

    D: np.ndarray
    I: np.ndarray
    slide_of: np.ndarray
    tiles: dict[int, tuple[int, int, int, int]]


def search_tiles(
    live: LiveIndex, catalog: Catalog, xq: np.ndarray, top_k: int, id_filter: IdFilter | None
) -> Neighbours:
    """The nearest tiles of each query tile, k large enough that they reach `top_k` slides
    (or every allowed tile). Each round looks up the slides of the tiles it newly found, in
    one catalog statement; the first k (8 neighbours per wanted slide, at least 64) usually
    suffices, so a search usually makes one."""
    ntotal = live.ntotal
    n_allowed = ntotal if id_filter is None or id_filter.include is None else len(id_filter.include)
    k = min(max(8 * top_k, 64), max(1, ntotal))
    tiles: dict[int, tuple[int, int, int, int]] = {}
    while True:
        D, I = live.search(xq, k, id_filter)
        # a wider search returns the earlier hits again: look up only the new ones
        tiles.update(tile_rows(catalog, np.setdiff1d(I[I >= 0], np.fromiter(tiles, np.int64, len(tiles)))))
        if len({t[0] for t in tiles.values()}) >= top_k or k >= n_allowed or k >= ntotal:
            break
        k = min(k * 4, ntotal)
    known = np.isin(I, np.fromiter(tiles, np.int64, len(tiles))) & (I >= 0)
    slide_of = np.full(I.shape, -1, np.int64)
    slide_of[known] = [tiles[i][0] for i in I[known]]
    return Neighbours(np.where(known, D, -np.inf), I, slide_of, tiles)


def rank_slides(nb: Neighbours, top_k: int, rule: str) -> list[tuple[int, float]]:
    """The top_k (slide id, score), best first (ties: lower id first)."""
    D = nb.D
    floor = np.array([d[np.isfinite(d)].min() if np.isfinite(d).any() else 0.0 for d in D], np.float32)
    scores = slide_scores(D, nb.slide_of, floor, rule)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]


def matched_tiles(nb: Neighbours, slide_id: int) -> list[Region]:
    """Each query tile's best neighbour in the slide, as boxes, best first (a tile that is
    the best match of several query tiles once, with its best similarity)."""
    best: dict[int, float] = {}
    for q in range(len(nb.D)):
        in_slide = np.flatnonzero((nb.slide_of[q] == slide_id) & np.isfinite(nb.D[q]))
        if len(in_slide):
            j = in_slide[np.argmax(nb.D[q, in_slide])]
            tid = int(nb.I[q, j])
            best[tid] = max(best.get(tid, -np.inf), float(nb.D[q, j]))
    regions = []
    for tid, sim in sorted(best.items(), key=lambda kv: -kv[1])[:MAX_REGIONS]:
        _, x, y, size = nb.tiles[tid]
        regions.append(Region(x, y, size, size, sim))
    return regions
