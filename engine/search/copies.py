"""Region queries, copies found first.

The slides are ranked on features (engine.search.ranking: a slide's score is the mean over
query tiles of the best similarity of that tile to any tile of the slide). A region query is
very often a copy of part of an archived slide (a screenshot, an export, a crop), and then
its pixels settle what features only suggest: the region is registered on the pixels of
every slide with a hit among the VERIFY_TILES best (query tile, archive tile) pairs, and of
the REFINE_SLIDES best-ranked ones (engine.search.localise), best-ranked first, until
VERIFY_BUDGET_S of CPU time have passed (the first slide is always tried; the query's
`pixel_check` says how many were tried, of how many, and whether the budget stopped it).

A slide with a pixel-verified match ranks above every slide matched by features only (among
themselves, in their feature order; each keeps its feature score); its verified box comes
first in its regions (match "pixels", shown as "exact"). A copy is proof, a feature score
only resemblance: the demo's rotated JPEG crop of CMU-1 found its exact copy in two slides
that ranked 2nd and 3rd below a slide with no pixel match (issue 13).
"""

from __future__ import annotations

import time

import numpy as np

from engine.search.filters import id_filter
from engine.search.live_index import LiveIndex
from engine.search.localise import RegionQuery
from engine.search.lookups import result_slides
from engine.search.placement import pixel_match, placed_regions
from engine.search.ranking import Neighbours, matched_tiles, rank_slides, search_tiles
from engine.search.results import MAX_REGIONS, SlideHit

REFINE_SLIDES = 3  # the best-ranked slides always among those verified on pixels
VERIFY_TILES = 50  # ... and every slide with a hit among this many best (query tile, archive tile) pairs
VERIFY_BUDGET_S = 1.0  # no slide is started after this many CPU seconds of verification ...
VERIFY_WALL_MAX_S = 10.0  # ... or this many seconds on the clock (a slow file system, a loaded machine)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def allowed_ids(live: LiveIndex, filters: dict | None, exclude: dict):
    """The tile-id filter of the filters and exclusions (engine.search.filters)."""
    with live.catalog.session() as s:
        return id_filter(s, live.encoder_row["id"], filters, **exclude)


def verify_order(nb: Neighbours, ranked: list[tuple[int, float]]) -> list[int]:
    """The slides to verify on pixels, best-ranked first: the REFINE_SLIDES best and every
    slide with a hit among the VERIFY_TILES best pairs."""
    rank = {sid: i for i, (sid, _) in enumerate(ranked)}
    D, S = nb.D.ravel(), nb.slide_of.ravel()
    ok = np.flatnonzero(np.isfinite(D) & (S >= 0))
    best = ok[np.argsort(-D[ok], kind="stable")[:VERIFY_TILES]]
    ids = {int(s) for s in S[best] if int(s) in rank} | {sid for sid, _ in ranked[:REFINE_SLIDES]}
    return sorted(ids, key=rank.__getitem__)


def verify(slides: dict, order: list[int], match, budget_s: float = VERIFY_BUDGET_S):
    """Pixel matches (slide id -> Region) among `order` (slides by id: engine.search.lookups
    SlideRow), tried in order until `budget_s` has passed; and what was tried. `match(slide
    info, slide mpp)`: the Region the region is a copy of, or None.

    The budget is this thread's CPU time (the registration's own work: decoding, FFTs), not
    the clock: on a machine shared with other work the same query then verifies the same
    slides and gets the same answer (measured: a 2-core machine at load 12 took 6x longer on
    the clock, and a copy ranked 2nd on features went unverified). The clock still bounds
    it, at VERIFY_WALL_MAX_S."""
    c0, t0 = time.thread_time(), time.perf_counter()
    found, tried, stopped = {}, 0, False
    for sid in order:
        spent = time.thread_time() - c0
        if tried and (spent > budget_s or time.perf_counter() - t0 > max(VERIFY_WALL_MAX_S, budget_s)):
            stopped = True
            break
        row = slides.get(sid)
        if row is None or not row.mpp:
            continue
        tried += 1
        box = match(row.info, row.mpp)
        if box is not None:
            found[sid] = box
    check = {"slides": tried, "of": len(order), "budget_s": budget_s, "stopped_by_budget": stopped}
    return found, check


def region_hits(
    live: LiveIndex,
    xq: np.ndarray,
    q_cells: np.ndarray,
    top_k: int,
    filters: dict | None,
    exclude: dict,
    timing: dict,
    region: RegionQuery | None,
    views,
    nb: Neighbours | None = None,
    match=None,
) -> tuple[list[SlideHit], dict]:
    """The top_k slides for a region's query tiles `xq` (grid cells `q_cells`), copies first;
    `nb`: the index's answer when already searched; `match(slide info, slide mpp)`: how a
    copy is verified (default: `region` registered at its mpp, placement.pixel_match).
    Returns (hits, pixel_check)."""
    catalog = live.catalog
    if nb is None:
        allowed = allowed_ids(live, filters, exclude)
        t = time.perf_counter()
        nb = search_tiles(live, catalog, xq, top_k, allowed)
        timing["search"] = _ms(t)
    t = time.perf_counter()
    ranked = rank_slides(nb, 2**31, "mean")
    top = [sid for sid, _ in ranked[:top_k]]
    order = verify_order(nb, ranked) if region is not None else []
    place = len(xq) > 1
    # one catalog statement: the result slides with their tiles, the other candidates without
    slides = result_slides(
        catalog,
        list(dict.fromkeys(top + order)),
        with_tiles=place,
        tiles_of=top,
        encoder_id=live.encoder_row["id"],  # with several encoders, a slide has tiles of each
    )
    timing["aggregate"] = _ms(t)
    t = time.perf_counter()
    if match is None and region is not None:

        def match(info, slide_mpp):
            return pixel_match(info, region, slide_mpp, views)

    found, check = verify(slides, order, match, VERIFY_BUDGET_S) if region is not None else ({}, None)
    timing["refine"] = _ms(t)
    score = dict(ranked)
    final = [sid for sid in order if sid in found] + [sid for sid in top if sid not in found and sid in slides]
    hits = []
    for rank, sid in enumerate(final[:top_k], 1):
        row = slides[sid]
        if place and len(row.tile_ids):
            regions = placed_regions(xq, q_cells, row.tile_ids, row.boxes, live.vectors)
        else:
            regions = matched_tiles(nb, sid)
        if sid in found:
            regions = [found[sid], *regions][:MAX_REGIONS]
        hits.append(SlideHit(rank, row.info, score[sid], regions))
    return hits, check
