"""Search the archive by region or by slide: embed the query tiles, find their nearest
tiles over all shards of the index's encoder, group them into slides, rank the slides, and
say where in each slide the match is (level-0 boxes) and what the top slides' labels vote for.

Region query: the image is resampled to the index's microns per pixel, cut into a centred
grid of tiles (tiles without tissue dropped), each tile searched. A slide's score is the mean
over query tiles of the best similarity of that tile to any tile of the slide.

Slide query: a mosaic (engine.search.mosaic) of ~10 % of the slide's tiles, spread over its kinds of
tissue and its area, each searched. A slide's score is the median over mosaic tiles of their
best similarity to the slide (the median ignores a few tiles that match by chance, such as
background or folds, in a way the mean and max do not).

A query tile that does not retrieve any tile of a slide counts with the lowest similarity it
did retrieve (its k-th neighbour), an upper bound of its true best match in that slide;
k grows until `top_k` slides are found or every allowed tile was retrieved.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sqlalchemy as sa
import torch
from PIL import Image

from engine.catalog.db import Catalog
from engine.catalog.base import utcnow
from engine.catalog.models import INDEXED, MISSING, SHARD_OK, SHARD_QUARANTINED, Shard, Slide, Tile
from engine.catalog.models import EncoderRecord
from engine.config import Settings
from engine.encoder import Encoder, l2_normalise
from engine.errors import EncoderError, NotFound, QueryError
from engine.images import to_uint8_chw
from engine.index import FLAT_MAX_TILES, IdFilter, choose_kind, gpu_available, open_index, sync_index
from engine.evaluation.metrics import majority_vote
from engine.shards import ShardEncoder, encoder_dir

if TYPE_CHECKING:
    from engine.search.localise import RegionQuery

LOG = logging.getLogger(__name__)

FILTER_FIELDS = ("site", "diagnosis", "collection", "label")
MPP_RATIO_MAX = 4.0  # a region more than 4x finer or coarser than the index is refused
MIN_TISSUE = 0.25  # a query tile needs this much tissue to be searched
MAX_QUERY_TILES = 64
# A region is resampled to the index's mpp before it is tiled, which can multiply its pixels
# by up to MPP_RATIO_MAX^2 (a 6300 x 6300 upload at 4 um/px became 25200 x 25200, 7 GB with
# its tissue mask, issue 11): the resampled size is checked against this before anything is
# allocated. 16 Mpx is a 4 x 4 mm region at 1 um/px, ~300 tiles of 224 px, far more than the
# MAX_QUERY_TILES searched; about 50 MB as RGB.
MAX_QUERY_PIXELS = 16_000_000
MAX_QUERY_ASPECT = 32  # longer side / shorter side: a thinner strip is a selection mistake
# the tissue mask of the resampled region (~50 bytes per pixel while computed) is taken from a
# copy reduced to at most this many pixels; tiles stay >= 50 px across in it
MASK_MAX_PIXELS = 2_000_000
MAX_REGIONS = 10  # matched boxes reported per slide
REFINE_SLIDES = 3  # region queries: the top slides whose box is pinned from pixels (engine.search.localise)
_SQL_CHUNK = 900  # bound parameters per IN (...) clause, under SQLite's limits


@dataclasses.dataclass
class Region:
    """A matched place, as a level-0 box of the result slide. `match` says how it was
    found: "features" (a tile matched by encoder features; score = cosine similarity) or
    "pixels" (the region's own pixels registered on the slide, engine.search.localise; score =
    the normalised cross-correlation of its texture, accepted from ACCEPT_NCC up)."""

    x: int
    y: int
    w: int
    h: int
    score: float
    match: str = "features"


@dataclasses.dataclass
class SlideHit:
    rank: int
    slide: dict
    score: float
    regions: list[Region]


@dataclasses.dataclass
class SearchResult:
    query: dict
    results: list[SlideHit]
    suggestion: dict
    timing_ms: dict
    # what the answer left out (quarantined shards, missing slide files); degraded = any
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "degraded": bool(self.warnings),
            "warnings": list(self.warnings),
            "query": self.query,
            "results": [
                {"rank": h.rank, "slide": h.slide, "score": round(h.score, 6), "regions": [{**dataclasses.asdict(r), "score": round(r.score, 6)} for r in h.regions]}
                for h in self.results
            ],
            "suggestion": self.suggestion,
            "timing_ms": {k: round(v, 2) for k, v in self.timing_ms.items()},
        }


def _chunks(values, size: int = _SQL_CHUNK):
    values = list(values)
    for i in range(0, len(values), size):
        yield values[i : i + size]


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


# the 8 symmetries of the square: a region may come rotated or mirrored
_D8 = [(1, 0, 0, 1), (0, -1, 1, 0), (-1, 0, 0, -1), (0, 1, -1, 0), (-1, 0, 0, 1), (0, 1, 1, 0), (1, 0, 0, -1), (0, -1, -1, 0)]


def locate_region(xq: np.ndarray, q_cells: np.ndarray, xs: np.ndarray, s_cells: np.ndarray, anchors_per_tile: int = 5) -> tuple[np.ndarray, np.ndarray]:
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


class SearchEngine:
    """Searches one archive (catalog + shard index) with one encoder.

    settings:   where the catalog and index are, which encoder, device
    catalog:    an open Catalog to share (default: opened from settings.catalog_url)
    encoder:    a loaded engine.encoder.Encoder to share (default: loaded from settings)
    index_kind: 'auto' (flat up to `flat_max` tiles, compressed above), 'flat', 'compressed'
    """

    def __init__(self, settings: Settings, catalog: Catalog | None = None, encoder: Encoder | None = None, *, index_kind: str = "auto", flat_max: int = FLAT_MAX_TILES, progress: bool = False):
        self.settings = settings
        self.catalog = catalog or Catalog(settings.catalog_url)
        self.encoder = encoder or Encoder.from_spec(settings.require_encoder(), device=settings.device, precision=settings.precision)
        choose_kind(0, index_kind)  # validates
        self.index_kind = index_kind
        self.flat_max = flat_max
        self.progress = progress
        self.use_gpu = settings.device != "cpu" and gpu_available()
        self.index = None
        # refresh() changes the index in place; a web server's threads search the same
        # engine, so index reads and the refresh take turns (embedding runs outside)
        self._index_lock = threading.RLock()
        self.encoder_row: dict | None = None
        self._damaged: dict[int, str] = {}  # shard row ids that failed to load -> why
        self.warnings: list[str] = []  # what search leaves out, shown in every result
        self.refresh()

    # -- the index -------------------------------------------------------------------------

    def _find_encoder_row(self, s) -> EncoderRecord:
        info = self.encoder.info
        rows = s.scalars(sa.select(EncoderRecord).where(sa.exists().where(Shard.encoder_id == EncoderRecord.id))).all()
        if not rows:
            raise NotFound("the archive has no indexed slides yet: run `indexer build ARCHIVE_DIR` first")
        mine = [r for r in rows if r.checkpoint_sha256 == info.checkpoint_sha256]
        if not mine:
            known = ", ".join(f"{r.name} (sha256 {r.checkpoint_sha256[:12]})" for r in rows)
            raise EncoderError(f"the query encoder {info.describe()} is not the one the index was built with: {known}; pass that checkpoint as --encoder")
        same_grid = [r for r in mine if r.target_mpp == self.settings.target_mpp and r.tile_px == self.settings.tile_px]
        return (same_grid or mine)[0]

    def refresh(self) -> None:
        """Bring the index in step with the catalog: load new shards, drop removed ones (and
        switch between flat and compressed when the archive crossed the size threshold).

        Only shards whose slides are all indexed are searched: a slide marked missing (its
        file is gone or changed, see `indexer build`) leaves search with its shard. A shard
        that fails its checks on loading (sha256 of the catalog, readable, unit vectors) is
        quarantined in the catalog with the reason and left out, so search answers from the
        others and says so (`self.warnings`, shown in every result); it is not tried again
        until the catalog has another version of it (`indexer build` re-embeds its slides)."""
        with self._index_lock:
            with self.catalog.session() as s:
                row = self._find_encoder_row(s)
                shards = s.execute(sa.select(Shard.id, Shard.path, Shard.sha256, Shard.count, Shard.status).where(Shard.encoder_id == row.id)).all()
                # tiles of slides that are not indexed (missing files): few, and found by the
                # (slide_id, ...) index, so this stays cheap on an archive of millions of tiles
                hidden = set(s.scalars(sa.select(Tile.shard_id).join(Slide, Slide.id == Tile.slide_id).where(Slide.status != INDEXED).distinct()))
                missing = s.scalar(sa.select(sa.func.count(Slide.id)).where(Slide.status == MISSING, Slide.encoder_id == row.id))
                self.encoder_row = {"id": row.id, "name": row.name, "target_mpp": row.target_mpp, "tile_px": row.tile_px, "dim": row.dim, "sha256": row.checkpoint_sha256}
            if row.dim != self.encoder.dim:
                raise EncoderError(f"the index holds {row.dim}-d vectors, the encoder gives {self.encoder.dim}-d")
            index_dir = Path(self.settings.index_dir)
            quarantined = [sh for sh in shards if sh.status != SHARD_OK]
            # damaged shards are remembered by row id (never reused): a rebuilt shard is a new
            # row, and tried again even when its bytes (and sha256) are the same as before
            live = [sh for sh in shards if sh.status == SHARD_OK and sh.id not in hidden and sh.id not in self._damaged]
            files = {f"{sh.path}:{sh.sha256}": index_dir / sh.path for sh in live}
            checksums = {f"{sh.path}:{sh.sha256}": sh.sha256 for sh in live}
            damaged: dict[str, str] = {}

            def on_error(key: str, exc: Exception) -> None:
                LOG.error("search index: leaving out %s", exc)
                damaged[key] = str(exc)

            kind = choose_kind(sum(sh.count for sh in live), self.index_kind, self.flat_max)
            if self.index is None or self.index.kind != kind:
                folder = encoder_dir(index_dir, ShardEncoder.of(row)) / "compressed"
                self.index = open_index(kind, row.dim, files, folder=folder, use_gpu=self.use_gpu, progress=self.progress, sha256=checksums, on_error=on_error)
            else:
                sync_index(self.index, files, progress=self.progress, sha256=checksums, on_error=on_error)
            row_of = {f"{sh.path}:{sh.sha256}": sh.id for sh in live}
            self._damaged.update({row_of[key]: why for key, why in damaged.items()})
            if damaged:
                self._quarantine(damaged)
            n_bad = len(quarantined) + len(damaged)
            self.warnings = []
            if n_bad:
                self.warnings.append(f"{n_bad} damaged shard file(s) are quarantined and their slides left out of search; `indexer verify` lists them and `indexer build` re-embeds them")
            if missing:
                self.warnings.append(f"{missing} slide(s) are left out of search because their files are missing or changed; `indexer verify` lists them")
            LOG.info("search index: %s, %d tiles in %d shards%s", kind, self.index.ntotal, len(files) - len(damaged), f" ({n_bad} quarantined)" if n_bad else "")

    def _quarantine(self, damaged: dict[str, str]) -> None:
        """Mark damaged shards (key "path:sha256" -> reason) quarantined in the catalog, so
        `indexer verify` and `indexer build` see them. A catalog this process may not write
        (a read-only database user) only costs the record: they stay left out here."""
        try:
            with self.catalog.session() as s:
                for key, reason in damaged.items():
                    path, sha = key.rsplit(":", 1)
                    s.execute(sa.update(Shard).where(Shard.path == path, Shard.sha256 == sha).values(status=SHARD_QUARANTINED, error=reason[:2000], updated_at=utcnow()))
        except sa.exc.SQLAlchemyError as exc:
            LOG.warning("could not record quarantined shards in the catalog (%s); they stay out of this process's search", exc)

    @property
    def index_mpp(self) -> float:
        return float(self.encoder_row["target_mpp"])

    @property
    def tile_px(self) -> int:
        return int(self.encoder_row["tile_px"])

    # -- filters ---------------------------------------------------------------------------

    def _id_filter(self, s, filters: dict | None, exclude_slides: set[int]) -> IdFilter | None:
        filters = {k: v for k, v in (filters or {}).items() if v not in (None, "")}
        unknown = set(filters) - set(FILTER_FIELDS)
        if unknown:
            raise ValueError(f"unknown filter fields {sorted(unknown)}; use {FILTER_FIELDS}")
        include = None
        if filters:
            q = sa.select(Slide.id).where(Slide.status == INDEXED, Slide.encoder_id == self.encoder_row["id"])
            for field, value in filters.items():
                q = q.where(getattr(Slide, field) == value)
            slides = [i for i in s.scalars(q) if i not in exclude_slides]
            include = np.array(s.scalars(sa.select(Tile.id).where(Tile.slide_id.in_(slides))).all() if slides else [], np.int64)
            return IdFilter(include=include)
        if not exclude_slides:
            return None
        exclude = np.array(s.scalars(sa.select(Tile.id).where(Tile.slide_id.in_(sorted(exclude_slides)))).all(), np.int64)
        return IdFilter(exclude=exclude)

    # -- the shared core -------------------------------------------------------------------

    def _rank(self, xq: np.ndarray, top_k: int, id_filter: IdFilter | None, rule: str, timing: dict, q_cells: np.ndarray | None = None) -> list[SlideHit]:
        """Search the query tiles, group by slide, rank, and describe the top_k slides.
        With `q_cells` (the grid cells of a region's tiles) each result's regions are the
        region's best placement in that slide (`locate_region`); otherwise each query
        tile's best match in it."""
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        t = time.perf_counter()
        n_allowed = self.index.ntotal if id_filter is None or id_filter.include is None else len(id_filter.include)
        k = min(max(8 * top_k, 64), max(1, self.index.ntotal))
        tiles: dict[int, tuple[int, int, int, int]] = {}
        while True:
            D, I = self.index.search(xq, k, id_filter)
            # a wider search returns the earlier hits again: look up only the new ones
            tiles.update(self._tiles(np.setdiff1d(I[I >= 0], np.fromiter(tiles, np.int64, len(tiles)))))
            if len({tiles[i][0] for i in tiles}) >= top_k or k >= n_allowed or k >= self.index.ntotal:
                break
            k = min(k * 4, self.index.ntotal)
        timing["search"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        known = np.isin(I, np.fromiter(tiles, np.int64, len(tiles))) & (I >= 0)
        D = np.where(known, D, -np.inf)
        floor = np.array([d[np.isfinite(d)].min() if np.isfinite(d).any() else 0.0 for d in D], np.float32)
        slide_of = np.full(I.shape, -1, np.int64)
        slide_of[known] = [tiles[i][0] for i in I[known]]
        scores = slide_scores(D, slide_of, floor, rule) if known.any() else {}
        scores.pop(-1, None)
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        hits = []
        with self.catalog.session() as s:
            meta = {sl.id: sl for sl in s.scalars(sa.select(Slide).where(Slide.id.in_([sid for sid, _ in ranked])))}
        for rank, (sid, score) in enumerate(ranked, 1):
            sl = meta[sid]
            info = {"id": sl.id, "path": sl.path, "patient": sl.patient, "site": sl.site, "diagnosis": sl.diagnosis, "label": sl.label}
            if q_cells is not None and len(xq) > 1:
                hits.append(SlideHit(rank, info, score, self._placed_regions(sid, xq, q_cells)))
                continue
            best: dict[int, float] = {}
            for q in range(len(xq)):
                in_slide = np.flatnonzero((slide_of[q] == sid) & np.isfinite(D[q]))
                if len(in_slide):
                    j = in_slide[np.argmax(D[q, in_slide])]
                    best[int(I[q, j])] = max(best.get(int(I[q, j]), -np.inf), float(D[q, j]))
            regions = []
            for tid, sim in sorted(best.items(), key=lambda kv: -kv[1])[:MAX_REGIONS]:
                _, x, y, size = tiles[tid]
                regions.append(Region(x, y, size, size, sim))
            hits.append(SlideHit(rank, info, score, regions))
        timing["aggregate"] = (time.perf_counter() - t) * 1000
        return hits

    def _placed_regions(self, slide_id: int, xq: np.ndarray, q_cells: np.ndarray) -> list[Region]:
        """The region's tiles placed on the slide, as boxes scored by cosine similarity."""
        with self.catalog.session() as s:
            rows = s.execute(sa.select(Tile.id, Tile.x, Tile.y, Tile.size).where(Tile.slide_id == slide_id)).all()
        if not rows:
            return []
        boxes = np.array([r[1:] for r in rows], np.int64)
        xs = self.index.vectors(np.array([r[0] for r in rows], np.int64))
        cells = np.stack([boxes[:, 0] // boxes[:, 2], boxes[:, 1] // boxes[:, 2]], axis=1)
        pick, _ = locate_region(xq, q_cells, xs, cells)
        regions = [Region(int(boxes[t, 0]), int(boxes[t, 1]), int(boxes[t, 2]), int(boxes[t, 2]), float(xq[q] @ xs[t])) for q, t in enumerate(pick) if t >= 0]
        return sorted(regions, key=lambda r: -r.score)[:MAX_REGIONS]

    def _tiles(self, ids: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
        """tile id -> (slide id, x, y, size) of tiles still in the catalog."""
        out = {}
        with self.catalog.session() as s:
            for part in _chunks(int(i) for i in ids):
                for row in s.execute(sa.select(Tile.id, Tile.slide_id, Tile.x, Tile.y, Tile.size).where(Tile.id.in_(part))):
                    out[int(row[0])] = (int(row[1]), int(row[2]), int(row[3]), int(row[4]))
        return out

    def _embed(self, tiles: list[Image.Image]) -> np.ndarray:
        batch = torch.stack([to_uint8_chw(t, self.tile_px) for t in tiles])
        return l2_normalise(self.encoder.embed(batch))

    @staticmethod
    def _suggest(hits: list[SlideHit]) -> dict:
        labels = [h.slide["label"] or h.slide["diagnosis"] for h in hits]
        labels = [lab for lab in labels if lab]
        if not labels:
            return {"label": None, "votes": {}}
        label, votes = majority_vote(labels)
        return {"label": label, "votes": votes}

    # -- region queries --------------------------------------------------------------------

    def region_tiles(self, image: Image.Image, mpp: float) -> tuple[list[Image.Image], list[tuple[int, int]]]:
        """The query tiles of a region image at `mpp` um/px: resampled to the index's mpp,
        a centred grid of tile_px tiles, those with enough tissue. Returns (tiles, their
        top-left corners in the resampled image).

        Every size is checked before the pixels are allocated: the resampled region is
        at most MAX_QUERY_PIXELS, at most MAX_QUERY_ASPECT times longer than wide, and its
        tissue mask is computed on a copy of at most MASK_MAX_PIXELS."""
        from engine.tissue import tissue_mask_rgb

        if not (np.isfinite(mpp) and mpp > 0):
            raise QueryError(f"the region's resolution must be a positive number of um/px, not {mpp!r}")
        scale = mpp / self.index_mpp
        if not 1 / MPP_RATIO_MAX <= scale <= MPP_RATIO_MAX:
            raise QueryError(f"the region is at {mpp:g} um/px, the index at {self.index_mpp:g} um/px: more than {MPP_RATIO_MAX:g}x apart; give the region's true mpp or magnification, or export it closer to {self.index_mpp:g} um/px")
        src_w, src_h = image.size
        if max(src_w, src_h) > MAX_QUERY_ASPECT * min(src_w, src_h):
            raise QueryError(f"the region is {src_w} x {src_h} px, more than {MAX_QUERY_ASPECT} times longer than wide; select a part of it nearer to a square")
        w, h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
        tile = self.tile_px
        if min(w, h) < tile // 2:
            raise QueryError(f"at the index's {self.index_mpp:g} um/px the region is {w} x {h} px; at least {tile // 2} x {tile // 2} are needed (select a larger region)")
        if min(w, h) < tile:
            # between half a tile and a tile: zoom it up to one tile rather than pad with glass
            grow = tile / min(w, h)
            w, h = max(tile, round(w * grow)), max(tile, round(h * grow))
        if w * h > MAX_QUERY_PIXELS:
            # the largest upload of the same shape that fits, in the upload's own pixels
            fit = (MAX_QUERY_PIXELS / (w * h)) ** 0.5
            raise QueryError(
                f"the region is too large to search: {src_w} x {src_h} px at {mpp:g} um/px covers {src_w * mpp / 1000:.1f} x {src_h * mpp / 1000:.1f} mm, "
                f"{w} x {h} px at the index's {self.index_mpp:g} um/px, and a search takes at most {MAX_QUERY_PIXELS / 1e6:g} Mpx there; "
                f"select a smaller area (at most {int(src_w * fit)} x {int(src_h * fit)} px at {mpp:g} um/px), or check that {mpp:g} um/px is the region's true resolution"
            )
        region = image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS) if (w, h) != image.size else image.convert("RGB")
        # the mask on a reduced copy when the region is large: tissue fractions per tile do
        # not need every pixel, and the mask's float images cost ~50 bytes per pixel
        f = 1
        while (w // f) * (h // f) > MASK_MAX_PIXELS:
            f += 1
        mask = tissue_mask_rgb(np.asarray(region.reduce(f) if f > 1 else region))
        nx, ny = w // tile, h // tile
        ox, oy = (w - nx * tile) // 2, (h - ny * tile) // 2
        cands = []
        for j in range(ny):
            for i in range(nx):
                x, y = ox + i * tile, oy + j * tile
                frac = float(mask[y // f : -(-(y + tile) // f), x // f : -(-(x + tile) // f)].mean())
                if frac >= MIN_TISSUE:
                    cands.append((frac, x, y))
        if not cands:
            raise QueryError(f"the region looks blank: no {tile} px tile of it has {MIN_TISSUE:.0%} tissue; select an area with tissue")
        cands = sorted(cands, key=lambda c: -c[0])[:MAX_QUERY_TILES]
        corners = [(x, y) for _, x, y in cands]
        return [region.crop((x, y, x + tile, y + tile)) for x, y in corners], corners

    def search_region(self, image: Image.Image, *, mpp: float | None = None, magnification: float | None = None, top_k: int = 10, filters: dict | None = None, exclude_slide_id: int | None = None, exclude_patient: str | None = None) -> SearchResult:
        """Slides most similar to a region image. Its resolution is `mpp` (um/px), else
        10 / `magnification`, else the index's own."""
        t0 = time.perf_counter()
        if mpp is None and magnification is not None:
            if magnification <= 0:
                raise ValueError("magnification must be > 0")
            mpp = 10.0 / magnification
        mpp = self.index_mpp if mpp is None else float(mpp)
        if mpp <= 0:
            raise ValueError("mpp must be > 0")
        timing: dict[str, float] = {}
        t = time.perf_counter()
        tiles, corners = self.region_tiles(image, mpp)
        xq = self._embed(tiles)
        timing["embed"] = (time.perf_counter() - t) * 1000
        with self.catalog.session() as s:
            exclude = set()
            if exclude_slide_id is not None:
                exclude.add(int(exclude_slide_id))
            if exclude_patient:
                exclude |= set(s.scalars(sa.select(Slide.id).where(Slide.patient == exclude_patient)))
            id_filter = self._id_filter(s, filters, exclude)
        with self._index_lock:
            hits = self._rank(xq, top_k, id_filter, "mean", timing, q_cells=np.array(corners, np.int64) // self.tile_px)
        t = time.perf_counter()
        if hits:
            from engine.search.localise import RegionQuery

            region = RegionQuery(image, mpp)  # prepared once for all the slides tried
            tried = hits[:REFINE_SLIDES]
            with self.catalog.session() as s:
                mpps = dict(s.execute(sa.select(Slide.id, Slide.mpp).where(Slide.id.in_([h.slide["id"] for h in tried]))).all())
            for hit in tried:
                if mpps.get(hit.slide["id"]):
                    self._pixel_match(hit, region, float(mpps[hit.slide["id"]]))
        timing["refine"] = (time.perf_counter() - t) * 1000
        timing["total"] = (time.perf_counter() - t0) * 1000
        query = {"type": "region", "width": image.width, "height": image.height, "mpp": mpp, "index_mpp": self.index_mpp, "tiles": len(tiles), "top_k": top_k, "filters": filters or {}, "exclude_slide_id": exclude_slide_id, "exclude_patient": exclude_patient, "index": self.index.kind}
        return SearchResult(query, hits, self._suggest(hits), timing, warnings=list(self.warnings))

    @functools.cached_property
    def _views(self):
        """Low-resolution views of recently matched slides (engine.search.localise): the same
        slides come back query after query."""
        from engine.search.localise import ViewCache

        return ViewCache(maxsize=16)  # views are ~1 Mpx at most (4 MB), often far less

    def _pixel_match(self, hit: SlideHit, region: RegionQuery, slide_mpp: float) -> None:
        """When the region's pixels are a copy of part of the hit's slide, put that box
        first in its regions (engine.search.localise: features find the slide and a coarse place,
        registration pins the box). A slide that cannot be opened or read is left as it
        is: search results must not fail because one file is unreachable."""
        import openslide

        from engine.errors import SlideError
        from engine.search.localise import register_region
        from engine.slides import open_slide

        path = hit.slide["path"]
        try:
            slide = open_slide(path)
        except SlideError as exc:
            LOG.debug("no pixel match for slide %s: %s", hit.slide["id"], exc)
            return
        try:
            placed = register_region(slide, slide_mpp, region, views=self._views, path=path)
        except (openslide.OpenSlideError, OSError) as exc:
            LOG.debug("no pixel match for slide %s: cannot read %s: %s", hit.slide["id"], path, exc)
            return
        finally:
            slide.close()
        if placed is not None:
            hit.regions = [Region(placed.x, placed.y, placed.w, placed.h, placed.ncc, match="pixels"), *hit.regions][:MAX_REGIONS]

    # -- slide queries ---------------------------------------------------------------------

    def _resolve_slide(self, slide: int | str | Path) -> tuple[int | None, Path | None]:
        """(catalog id, None) for an indexed slide, (None, path) for a file not in the archive."""
        from engine.slides import fingerprint

        if isinstance(slide, (int, np.integer)) or (isinstance(slide, str) and slide.isdigit()):
            sid = int(slide)
        else:
            path = Path(slide)
            if not path.is_file():
                raise NotFound(f"{path}: no such slide file (give a slide file or the id of an indexed slide)")
            with self.catalog.session() as s:
                found = s.scalar(sa.select(Slide.id).where(Slide.fingerprint == fingerprint(path)))
            if found is None:
                return None, path
            sid = found
        with self.catalog.session() as s:
            row = s.get(Slide, sid)
            if row is None:
                raise NotFound(f"no slide with id {sid} in the catalog (`indexer status` lists them)")
            if row.status != INDEXED or row.encoder_id != self.encoder_row["id"]:
                raise QueryError(f"slide {sid} ({Path(row.path).name}) is not indexed with this encoder (status {row.status}); run `indexer build` or search with its file")
        return sid, None

    def _indexed_mosaic(self, slide_id: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        from engine.search.mosaic import select_mosaic

        with self.catalog.session() as s:
            rows = s.execute(sa.select(Tile.id, Tile.x, Tile.y, Tile.size).where(Tile.slide_id == slide_id).order_by(Tile.id)).all()
        if not rows:
            raise QueryError(f"slide {slide_id} has no tissue tiles in the index")
        ids = np.array([r[0] for r in rows], np.int64)
        with self._index_lock:
            vecs = self.index.vectors(ids)
        pick = select_mosaic(vecs, np.array([(r[1], r[2]) for r in rows], np.float64))
        return vecs[pick], [(rows[i][1], rows[i][2], rows[i][3]) for i in pick]

    def _file_mosaic(self, path: Path, default_mpp: float | None) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """Mosaic of a slide file that is not in the archive: tissue tiles on the index's
        grid, clustered by colour (so only the mosaic tiles are read and embedded)."""
        from engine.search.mosaic import colour_histograms, select_mosaic
        from engine.slides import describe_slide, open_slide, read_box
        from engine.tiling import tile_grid
        from engine.tissue import slide_thumbnail, tissue_mask_rgb

        slide = open_slide(path)
        try:
            info = describe_slide(path, slide, default_mpp)
            thumb, ds = slide_thumbnail(slide)
            boxes = tile_grid(info, tissue_mask_rgb(thumb), ds, self.index_mpp, self.tile_px, min_tissue=0.5)
            if not boxes:
                raise QueryError(f"{path.name}: no tissue tiles found at {self.index_mpp:g} um/px; is it blank or very small?")
            arr = np.array([(b.x, b.y, b.size) for b in boxes], np.float64)
            pick = select_mosaic(colour_histograms(thumb, arr, ds), arr[:, :2])
            chosen = [boxes[i] for i in pick]
            xq = self._embed([read_box(slide, b.x, b.y, b.size, self.tile_px) for b in chosen])
        finally:
            slide.close()
        return xq, [(b.x, b.y, b.size) for b in chosen]

    def search_slide(self, slide: int | str | Path, *, top_k: int = 10, filters: dict | None = None, exclude_self: bool = True, default_mpp: float | None = None) -> SearchResult:
        """Slides most similar to a whole slide: an indexed slide (its id, or its file) or a
        slide file not in the archive (`default_mpp` when the file has no resolution)."""
        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        slide_id, path = self._resolve_slide(slide)
        t = time.perf_counter()
        xq, boxes = self._indexed_mosaic(slide_id) if slide_id is not None else self._file_mosaic(path, default_mpp)
        timing["mosaic"] = (time.perf_counter() - t) * 1000
        with self.catalog.session() as s:
            id_filter = self._id_filter(s, filters, {slide_id} if exclude_self and slide_id is not None else set())
        with self._index_lock:
            hits = self._rank(xq, top_k, id_filter, "median", timing)
        timing["total"] = (time.perf_counter() - t0) * 1000
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
        return SearchResult(query, hits, self._suggest(hits), timing, warnings=list(self.warnings))
