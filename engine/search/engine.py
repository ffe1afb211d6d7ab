"""Search the archive by region or by slide: embed the query tiles (engine.search.query),
find their nearest tiles over all shards of the index's encoder (engine.search.live_index),
group them into slides and rank the slides (engine.search.ranking), and say where in each
slide the match is (engine.search.placement) and what the top slides' labels vote for.

Region query: a slide's score is the mean over query tiles of the best similarity of that
tile to any tile of the slide; slides the region is a pixel-verified copy of rank first
(engine.search.copies); a region of unknown mpp is searched at the scale estimated from the
archive (engine.search.scale). Slide query: a mosaic (engine.search.mosaic) of ~10 % of the
slide's tiles, spread over its kinds of tissue and its area, each searched; a slide's score
is the median over mosaic tiles of their best similarity to the slide (the median ignores a
few tiles that match by chance, such as background or folds, in a way the mean and max do
not).

Once the index has answered, a search reads the catalog twice (engine.search.lookups): the
neighbour tiles' slides and boxes, then the result slides with what placing the region on
them needs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from engine.catalog.db import Catalog
from engine.config import Settings
from engine.encoder import Encoder
from engine.errors import QueryError
from engine.index import FLAT_MAX_TILES, gpu_available
from engine.search import query as Q
from engine.search.copies import allowed_ids, region_hits
from engine.search.filters import id_filter
from engine.search.live_index import LiveIndex
from engine.search.localise import RegionQuery, view_cache
from engine.search.lookups import resolve_slide, result_slides, slide_tiles
from engine.search.placement import placed_regions
from engine.search.ranking import check_top_k, matched_tiles, rank_slides, search_tiles
from engine.search.rescale_match import any_scale_matcher
from engine.search.results import SearchResult, SlideHit, suggest
from engine.search.scale import describe as describe_scale
from engine.search.scale import estimate_mpp
from engine.search.which_encoder import search_encoder


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def find_hits(
    live: LiveIndex,
    xq: np.ndarray,
    top_k: int,
    filters: dict | None,
    exclude: dict,
    rule: str,
    timing: dict,
    q_cells: np.ndarray | None = None,
):
    """Search, rank and describe the top_k slides; with `q_cells` (a region's tile grid
    cells, more than one) each hit's regions are the region placed on the slide, else
    each query tile's best match in it. Returns (hits, result slide rows by id)."""
    catalog = live.catalog
    with catalog.session() as s:
        allowed = id_filter(s, live.encoder_row["id"], filters, **exclude)
    t = time.perf_counter()
    nb = search_tiles(live, catalog, xq, top_k, allowed)
    timing["search"] = _ms(t)
    t = time.perf_counter()
    ranked = rank_slides(nb, top_k, rule)
    place = q_cells is not None and len(xq) > 1
    slides = result_slides(catalog, [sid for sid, _ in ranked], with_tiles=place, encoder_id=live.encoder_row["id"])
    ranked = [(sid, score) for sid, score in ranked if sid in slides]  # removed meanwhile
    hits = []
    for rank, (sid, score) in enumerate(ranked, 1):
        row = slides[sid]
        regions = (
            placed_regions(xq, q_cells, row.tile_ids, row.boxes, live.vectors) if place else matched_tiles(nb, sid)
        )
        hits.append(SlideHit(rank, row.info, score, regions))
    timing["aggregate"] = _ms(t)
    return hits, slides


def region_query(engine, image: Image.Image, mpp: float | None, allowed, top_k: int, timing: dict):
    """A region's query tiles and the index's answer: (mpp, candidate scales or None, vectors,
    grid cells, Neighbours or None to search). At unknown `mpp` (None) the scale ladder's
    (engine.search.scale); else the region cut at `mpp` (engine.search.query) and searched."""
    cands, nb = None, None
    if mpp is None:  # unknown: estimated on the ladder, whose tiles at that scale are the query's
        est = estimate_mpp(engine, image, allowed, top_k, timing)
        mpp, cands, xq, q_cells, nb = est.mpp, est.cands, est.xq, est.cells, est.nb
    else:
        t = time.perf_counter()
        tiles, corners = Q.region_tiles(image, mpp, engine.index_mpp, engine.tile_px)
        xq = Q.embed(engine.encoder, tiles, engine.tile_px)
        q_cells = np.array(corners, np.int64) // engine.tile_px
        timing["embed"] = _ms(t)
    if nb is None:
        t = time.perf_counter()
        nb = search_tiles(engine.live, engine.catalog, xq, top_k, allowed)
        timing["search"] = timing.get("search", 0.0) + _ms(t)
    return mpp, cands, xq, q_cells, nb


def indexed_mosaic(live: LiveIndex, slide_id: int, encoder_id: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The mosaic of an indexed slide, from its vectors of this encoder in the index."""
    from engine.search.mosaic import select_mosaic

    rows = slide_tiles(live.catalog, slide_id, encoder_id)
    if not rows:
        raise QueryError(f"slide {slide_id} has no tissue tiles in the index")
    vecs = live.vectors(np.array([r[0] for r in rows], np.int64))
    pick = select_mosaic(vecs, np.array([(r[1], r[2]) for r in rows], np.float64))
    return vecs[pick], [(rows[i][1], rows[i][2], rows[i][3]) for i in pick]


def copy_matcher(image: Image.Image, cands, views, measured: dict):
    """At an unknown scale (`cands`: the ladder's candidates), copies are verified over scales
    around the best candidate's, then the others' (best feature score first), which measures
    the scale (engine.search.rescale_match); at a known one, None (the default matcher)."""
    if cands is None:
        return None
    ranked = [c.mpp for c in sorted(cands, key=lambda c: -c.score)]
    return any_scale_matcher(image, ranked[0], views, measured, tuple(ranked[1:]))


def search_encoder_for(settings: Settings, catalog: Catalog, encoder: Encoder | None, name: str | None):
    """(encoder, grid) a SearchEngine searches with: `encoder` when given (on the settings'
    grid), else the one `name` or settings.encoder names, else the index's only one
    (engine.search.which_encoder.search_encoder); a catalog encoder named brings its grid,
    which picks its row among rows of the same weights."""
    if encoder is not None:
        return encoder, settings.grid_for(encoder.info)
    spec, row = search_encoder(catalog, name or settings.encoder)
    encoder = Encoder.from_spec(spec, device=settings.device, precision=settings.precision)
    return encoder, ((row["target_mpp"], row["tile_px"]) if row else settings.grid_for(encoder.info))


class SearchEngine:
    """Searches one archive (catalog + shard index) with one encoder.

    settings:   where the catalog and index are, which encoder, device
    catalog:    an open Catalog to share (default: opened from settings.catalog_url)
    encoder:    a loaded engine.encoder.Encoder to share (default: search_encoder_for)
    encoder_name: which of the archive's encoders to search with (several over one archive)
    index_kind: 'auto' (flat up to `flat_max` tiles, compressed above), 'flat', 'compressed'
    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        encoder: Encoder | None = None,
        *,
        encoder_name: str | None = None,
        index_kind: str = "auto",
        flat_max: int = FLAT_MAX_TILES,
        progress: bool = False,
    ):
        self.settings = settings
        self.catalog = catalog or Catalog(settings.catalog_url)
        self.encoder, grid = search_encoder_for(settings, self.catalog, encoder, encoder_name)
        gpu = settings.device != "cpu" and gpu_available()
        options = {"kind": index_kind, "flat_max": flat_max, "use_gpu": gpu, "progress": progress}
        self.live = LiveIndex(self.catalog, self.encoder, settings.index_dir, *grid, **options)
        # low-resolution views of recently matched slides: the same slides come back
        self.views = view_cache()
        self.refresh()

    def refresh(self) -> None:
        """Bring the index in step with the catalog (engine.search.live_index.LiveIndex.refresh)."""
        self.live.refresh()

    @property
    def index(self):
        return self.live.index

    @property
    def encoder_row(self) -> dict:
        return self.live.encoder_row

    @property
    def warnings(self) -> list[str]:
        """What search leaves out (quarantined shards, missing slides), in every result."""
        return self.live.warnings

    @property
    def encoder_summary(self) -> dict:
        """Which encoder answers, as every result says: its catalog name, id and grid."""
        return {k: self.encoder_row[k] for k in ("name", "id", "target_mpp", "tile_px")}

    @property
    def index_mpp(self) -> float:
        return float(self.encoder_row["target_mpp"])

    @property
    def tile_px(self) -> int:
        return int(self.encoder_row["tile_px"])

    def search_region(
        self,
        image: Image.Image,
        *,
        mpp: float | None = None,
        magnification: float | None = None,
        top_k: int = 10,
        filters: dict | None = None,
        exclude_slide_id: int | None = None,
        exclude_patient: str | None = None,
    ) -> SearchResult:
        """Slides most similar to a region image, copies first (engine.search.copies), at `mpp`
        um/px, else 10 / `magnification`, else estimated (engine.search.scale)."""
        t0 = time.perf_counter()
        check_top_k(top_k)
        mpp = Q.region_mpp(mpp, magnification, self.index_mpp)
        timing: dict[str, float] = {}
        exclude = {"exclude_slide_id": exclude_slide_id, "exclude_patient": exclude_patient}
        allowed = allowed_ids(self.live, filters, exclude)
        mpp, cands, xq, q_cells, nb = region_query(self, image, mpp, allowed, top_k, timing)
        region = RegionQuery(image, mpp)  # prepared once for all the slides tried
        measured: dict[int, float] = {}  # slide id -> the region's mpp measured on its pixels
        match = copy_matcher(image, cands, self.views, measured)
        hits, check = region_hits(
            self.live, xq, q_cells, top_k, filters, exclude, timing, region, self.views, nb=nb, match=match
        )
        evidence = "features"
        if hits and hits[0].slide["id"] in measured:  # a pixel-verified copy beats any feature score
            mpp, evidence = measured[hits[0].slide["id"]], "pixels"
        timing["total"] = _ms(t0)
        query = {
            "type": "region",
            "width": image.width,
            "height": image.height,
            "mpp": mpp,
            "mpp_given": cands is None,
            "index_mpp": self.index_mpp,
            "tiles": len(xq),
            "top_k": top_k,
            "filters": filters or {},
            "exclude_slide_id": exclude_slide_id,
            "exclude_patient": exclude_patient,
            "index": self.index.kind,
            "encoder": self.encoder_summary,
            "pixel_check": check,
            "scale": describe_scale(cands, mpp, evidence) if cands is not None else None,
        }
        return SearchResult(query, hits, suggest(hits), timing, warnings=list(self.warnings))

    def search_slide(
        self,
        slide: int | str | Path,
        *,
        top_k: int = 10,
        filters: dict | None = None,
        exclude_self: bool = True,
        default_mpp: float | None = None,
    ) -> SearchResult:
        """Slides most similar to a whole slide: an indexed slide (its id, or its file) or a
        slide file not in the archive (`default_mpp` when the file has no resolution)."""
        t0 = time.perf_counter()
        check_top_k(top_k)
        timing: dict[str, float] = {}
        encoder_id = self.encoder_row["id"]
        slide_id, path = resolve_slide(self.catalog, slide, encoder_id)
        t = time.perf_counter()
        if slide_id is not None:
            xq, boxes = indexed_mosaic(self.live, slide_id, encoder_id)
        else:
            xq, boxes = Q.file_mosaic(path, default_mpp, self.encoder, self.index_mpp, self.tile_px)
        timing["mosaic"] = _ms(t)
        exclude = {"exclude_slide_id": slide_id if exclude_self else None}
        hits, _ = find_hits(self.live, xq, top_k, filters, exclude, "median", timing)
        timing["total"] = _ms(t0)
        query = {
            "type": "slide",
            "slide_id": slide_id,
            "path": str(path) if path else None,
            "mosaic": [{"x": x, "y": y, "w": size, "h": size} for x, y, size in boxes],
            "top_k": top_k,
            "filters": filters or {},
            "exclude_self": exclude_self,
            "index": self.index.kind,
            "encoder": self.encoder_summary,
        }
        return SearchResult(query, hits, suggest(hits), timing, warnings=list(self.warnings))
