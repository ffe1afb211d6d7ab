"""Unknown magnification: a region's scale estimated from the archive.

A screenshot or a camera photo does not say its microns per pixel (display zoom, camera,
export settings). The region is cut at each candidate resolution of LADDER (0.25 to 2 um/px
in steps of about the square root of 2) the index can take (within MPP_RATIO_MAX of the
index's, at least one tissue tile), at most LADDER_TILES tiles each (those with most tissue);
all candidates' tiles are embedded in ONE encoder batch and searched in ONE index call.

The evidence for a candidate scale is the mean, over its tiles, of each tile's similarity to
its nearest archive tile. Why: the archive holds tissue at the index's resolution; at the true
scale the region's tiles show nuclei, glands and fibres at the sizes archived tiles show them,
so they lie close to archive tiles (to their own copies when the region comes from the
archive), while at a wrong scale they show structures at sizes no archived tile has and
their nearest neighbours are further. The mean over tiles, not the best tile, keeps one
chance match from deciding. The slides are then ranked on the best candidate's tiles (those of
the ladder, and the rest of them for a large region), and the estimate is refined between
ladder steps by a parabola through the best score and its two neighbours (in log mpp; at most
half a step). A pixel-verified copy beats any feature score: at an estimated scale the slides
are verified over scales around it (engine.search.rescale_match, within the budget of
engine.search.copies), and when the first result is a copy, the scale measured on its pixels
is the estimate (evidence "pixels").

Cost: one encoder batch of at most len(LADDER) x LADDER_TILES tiles and one index search
stand for a known-mpp query's (plus one more of each for the best candidate's tiles beyond
those, in a large region); bench/region_scale.py measures the ratio (at most 3x, p50).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from engine.errors import QueryError
from engine.search import query as Q
from engine.search.ranking import Neighbours, search_tiles

LADDER = (0.25, 0.35, 0.5, 0.71, 1.0, 1.41, 2.0)  # um/px, steps of ~sqrt(2)
LADDER_TILES = 2  # tiles per candidate scale (those with most tissue)


@dataclasses.dataclass
class Candidate:
    mpp: float
    tiles: int  # query tiles at this scale (all, not only those of the ladder)
    score: float = float("nan")  # mean over its ladder tiles of the best similarity


@dataclasses.dataclass
class Grid:
    """A candidate scale's query tiles: edge in region pixels, corners, grid cells (most
    tissue first, engine.search.query.tissue_tiles) and the ladder's first few cut."""

    cand: Candidate
    src: int
    corners: list[tuple[int, int]]
    cells: list[tuple[int, int]]
    sample: list[np.ndarray]


@dataclasses.dataclass
class Estimate:
    """What the ladder found: the estimated mpp (refined), every candidate, and the query
    tiles of the best candidate as a known-mpp query would have them: vectors, grid cells,
    and the index's answer for them (None: to search, when tiles beyond the ladder's were
    added)."""

    mpp: float
    cands: list[Candidate]
    xq: np.ndarray
    cells: np.ndarray
    nb: Neighbours | None


def candidate_grids(image: Image.Image, index_mpp: float, tile: int) -> list[Grid]:
    """The ladder scales the region can be searched at, with their tiles; a QueryError (the
    reason at the scale nearest the index's) when none."""
    mask = Q.region_mask(image)
    out, errors = [], []
    for mpp in LADDER:
        try:
            src, corners, cells = Q.tissue_tiles(image, mpp, index_mpp, tile, mask=mask)
        except QueryError as exc:
            errors.append((abs(math.log(mpp / index_mpp)), str(exc)))
            continue
        sample = Q.cut_tiles(image, src, corners[:LADDER_TILES], tile)
        out.append(Grid(Candidate(mpp, len(corners)), src, corners, cells, sample))
    if not out:
        reason = min(errors)[1]
        raise QueryError(
            f"the region cannot be searched at any resolution from {LADDER[0]:g} to {LADDER[-1]:g} um/px ({reason}); give its mpp or magnification"
        )
    return out


def refine(cands: list[Candidate], best: int) -> float:
    """The best candidate's mpp moved toward the vertex of the parabola through its score and
    its neighbours' (log mpp), by at most half a step; unmoved at the ends of the ladder."""
    if not 0 < best < len(cands) - 1:
        return cands[best].mpp
    x = [math.log(cands[i].mpp) for i in (best - 1, best, best + 1)]
    y = [cands[i].score for i in (best - 1, best, best + 1)]
    d1, d2 = (y[1] - y[0]) / (x[1] - x[0]), (y[2] - y[1]) / (x[2] - x[1])
    curv = (d2 - d1) / (x[2] - x[0])
    if not curv < 0:
        return cands[best].mpp
    vertex = (x[0] + x[1]) / 2 - d1 / (2 * curv)  # p'(x) = d1 + curv (2x - x0 - x1) = 0
    half = min(x[1] - x[0], x[2] - x[1]) / 2
    return float(math.exp(min(max(vertex, x[1] - half), x[1] + half)))


def _rows(nb: Neighbours, rows: slice) -> Neighbours:
    return Neighbours(nb.D[rows], nb.I[rows], nb.slide_of[rows], nb.tiles)


def estimate_mpp(engine, image: Image.Image, allowed, top_k: int, timing: dict) -> Estimate:
    """The region's estimated um/px (module doc) and the best candidate's query tiles.
    `engine`: the SearchEngine (encoder, live index, grid); `allowed`: the tile-id filter.
    The ladder's tiles are embedded in one batch and searched in one index call; the best
    candidate's tiles beyond the ladder's (a large region) in one more of each."""
    import time

    t = time.perf_counter()
    grids = candidate_grids(image, engine.index_mpp, engine.tile_px)
    xq_all = Q.embed(engine.encoder, [a for g in grids for a in g.sample], engine.tile_px)  # one batch
    timing["embed"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    nb_all = search_tiles(engine.live, engine.catalog, xq_all, top_k, allowed)  # one index call
    timing["search"] = (time.perf_counter() - t) * 1000
    best_sim = np.where(np.isfinite(nb_all.D[:, 0]), nb_all.D[:, 0], -1.0)
    spans, start = [], 0
    for g in grids:
        spans.append(slice(start, start + len(g.sample)))
        g.cand.score = float(best_sim[spans[-1]].mean())
        start += len(g.sample)
    best = int(np.argmax([g.cand.score for g in grids]))
    cands = [g.cand for g in grids]
    g = grids[best]
    xq, nb = xq_all[spans[best]], _rows(nb_all, spans[best])
    if len(g.corners) > len(g.sample):
        t = time.perf_counter()
        rest = Q.cut_tiles(image, g.src, g.corners[len(g.sample) :], engine.tile_px)
        xq, nb = np.concatenate([xq, Q.embed(engine.encoder, rest, engine.tile_px)]), None
        timing["embed"] += (time.perf_counter() - t) * 1000
    return Estimate(refine(cands, best), cands, xq, np.array(g.cells, np.int64), nb)


def describe(cands: list[Candidate], estimate: float, evidence: str) -> dict:
    """The query's `scale` field: how the mpp was estimated, and each candidate's score."""
    return {
        "estimated_mpp": round(estimate, 4),
        "evidence": evidence,
        "candidates": [{"mpp": c.mpp, "score": round(c.score, 6), "tiles": c.tiles} for c in cands],
    }
