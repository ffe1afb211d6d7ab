"""Search the archive by region or by slide: embed the query tiles (engine.search.query),
find their nearest tiles over all shards of the index's encoder (engine.search.live_index),
group them into slides and rank the slides (engine.search.ranking), and say where in each
slide the match is (engine.search.placement) and what the top slides' labels vote for.

Region query: a slide's score is the mean over query tiles of the best similarity of that
tile to any tile of the slide. Slide query: a mosaic (engine.search.mosaic) of ~10 % of the
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
from engine.index import FLAT_MAX_TILES, gpu_available
from engine.search import query as Q
from engine.search.filters import id_filter
from engine.search.live_index import LiveIndex
from engine.search.localise import RegionQuery, view_cache
from engine.search.lookups import result_slides
from engine.search.placement import pin_on_pixels, placed_regions
from engine.search.ranking import check_top_k, matched_tiles, rank_slides, search_tiles
from engine.search.results import SearchResult, SlideHit, suggest

REFINE_SLIDES = 3  # region queries: the top slides whose box is pinned from pixels (engine.search.localise)


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
    slides = result_slides(catalog, [sid for sid, _ in ranked], with_tiles=place)
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


class SearchEngine:
    """Searches one archive (catalog + shard index) with one encoder.

    settings:   where the catalog and index are, which encoder, device
    catalog:    an open Catalog to share (default: opened from settings.catalog_url)
    encoder:    a loaded engine.encoder.Encoder to share (default: loaded from settings)
    index_kind: 'auto' (flat up to `flat_max` tiles, compressed above), 'flat', 'compressed'
    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        encoder: Encoder | None = None,
        *,
        index_kind: str = "auto",
        flat_max: int = FLAT_MAX_TILES,
        progress: bool = False,
    ):
        self.settings = settings
        self.catalog = catalog or Catalog(settings.catalog_url)
        self.encoder = encoder or Encoder.from_spec(
            settings.require_encoder(), device=settings.device, precision=settings.precision
        )
        use_gpu = settings.device != "cpu" and gpu_available()
        self.live = LiveIndex(
            self.catalog,
            self.encoder,
            settings.index_dir,
            settings.target_mpp,
            settings.tile_px,
            kind=index_kind,
            flat_max=flat_max,
            use_gpu=use_gpu,
            progress=progress,
        )
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
        """Slides most similar to a region image. Its resolution is `mpp` (um/px), else
        10 / `magnification`, else the index's own."""
        t0 = time.perf_counter()
        check_top_k(top_k)
        mpp = Q.region_mpp(mpp, magnification, self.index_mpp)
        timing: dict[str, float] = {}
        tiles, corners = Q.region_tiles(image, mpp, self.index_mpp, self.tile_px)
        xq = Q.embed(self.encoder, tiles, self.tile_px)
        timing["embed"] = _ms(t0)
        exclude = {"exclude_slide_id": exclude_slide_id, "exclude_patient": exclude_patient}
        hits, slides = find_hits(
            self.live, xq, top_k, filters, exclude, "mean", timing, q_cells=np.array(corners, np.int64) // self.tile_px
        )
        t = time.perf_counter()
        if hits:
            region = RegionQuery(image, mpp)  # prepared once for all the slides tried
            for hit in hits[:REFINE_SLIDES]:
                if slides[hit.slide["id"]].mpp:
                    pin_on_pixels(hit, region, slides[hit.slide["id"]].mpp, self.views)
        timing["refine"] = _ms(t)
        timing["total"] = _ms(t0)
        query = {
            "type": "region",
            "width": image.width,
            "height": image.height,
            "mpp": mpp,
            "index_mpp": self.index_mpp,
            "tiles": len(tiles),
            "top_k": top_k,
            "filters": filters or {},
            "exclude_slide_id": exclude_slide_id,
            "exclude_patient": exclude_patient,
            "index": self.index.kind,
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
        slide_id, path = Q.resolve_slide(self.catalog, slide, self.encoder_row["id"])
        t = time.perf_counter()
        if slide_id is not None:
            xq, boxes = Q.indexed_mosaic(self.catalog, self.live, slide_id)
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
        }
        return SearchResult(query, hits, suggest(hits), timing, warnings=list(self.warnings))
