"""`indexer status`: what the catalog says about each slide (as a whole and per encoder), and
per encoder its progress over the archive (indexed, pending, failed, missing slides) and the
grid (um/px, tile px) it indexed at, with whether that grid is the encoder's own or an
override."""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa
from sqlalchemy.orm import aliased

from engine.catalog.db import Catalog
from engine.catalog.models import FAILED, INDEXED, MISSING, PENDING, SLIDE_STATUSES, EncoderRecord, Slide, SlideEncoding
from engine.errors import ConfigError


def slide_statuses(catalog: Catalog, status: str | None = None) -> list[dict]:
    """One dict per slide (id, path, status, tiles, error, mpp, mpp_source, patient,
    collection, site, diagnosis, label, extra, `encoder`: the first encoder + grid it was
    indexed with as in `encoder_grids`, or None, and `encodings`: per encoder that tried it,
    {encoder_id, encoder, status, tiles, error}), ordered by id; `status` is the slide's own
    (engine.catalog.models); only slides of `status` when given."""
    if status is not None and status not in SLIDE_STATUSES:
        raise ConfigError(f"status must be one of {', '.join(SLIDE_STATUSES)}, not {status!r}")
    query = sa.select(Slide).order_by(Slide.id)
    if status is not None:
        query = query.where(Slide.status == status)
    grids = {g["id"]: g for g in encoder_grids(catalog)}
    with catalog.session() as s:
        per_slide: dict[int, list[dict]] = {}
        enc_query = sa.select(SlideEncoding).order_by(SlideEncoding.encoder_id)
        if status is not None:
            enc_query = enc_query.join(Slide, Slide.id == SlideEncoding.slide_id).where(Slide.status == status)
        for e in s.scalars(enc_query):
            per_slide.setdefault(e.slide_id, []).append(
                {
                    "encoder_id": e.encoder_id,
                    "encoder": (grids.get(e.encoder_id) or {}).get("name"),
                    "status": e.status,
                    "tiles": e.tile_count,
                    "error": e.error,
                }
            )
        return [
            {
                "id": sl.id,
                "path": sl.path,
                "status": sl.status,
                "tiles": sl.tile_count,
                "error": sl.error,
                "mpp": sl.mpp,
                "mpp_source": sl.mpp_source,
                "patient": sl.patient,
                "collection": sl.collection,
                "site": sl.site,
                "diagnosis": sl.diagnosis,
                "label": sl.label,
                "extra": sl.extra or {},
                "encoder": _brief(grids.get(sl.encoder_id)),
                "encodings": per_slide.get(sl.id, []),
            }
            for sl in s.scalars(query)
        ]


def status_counts(rows: list[dict]) -> dict[str, int]:
    counts = Counter(r["status"] for r in rows)
    out = {name: counts.get(name, 0) for name in SLIDE_STATUSES}
    out["tiles"] = sum(r["tiles"] or 0 for r in rows)
    return out


def encoder_grids(catalog: Catalog) -> list[dict]:
    """One dict per encoder row of the catalog (id, name, architecture, sha256, dim,
    target_mpp, tile_px, grid_source, indexed slides): `grid_source` is "encoder" when the
    grid is the encoder's own (a card's mpp/input_px, RetCCL's 1.0 um/px and 224 px),
    "override" when --target-mpp/--tile-px (or HISTOSEEK_TARGET_MPP/_TILE_PX) set any part
    of it, "unknown" for rows written before builds recorded it; `grid_sources` says which
    part came from where; `progress`: its slides {indexed, pending, failed, missing, tiles}
    (encoder_progress)."""
    with catalog.session() as s:
        progress = encoder_progress(s)
        out = []
        for row in s.scalars(sa.select(EncoderRecord).order_by(EncoderRecord.id)):
            parts = (row.normalisation or {}).get("grid_source")
            parts = parts if isinstance(parts, dict) else {}
            out.append(
                {
                    "id": row.id,
                    "name": row.name,
                    "architecture": row.architecture,
                    "sha256": row.checkpoint_sha256,
                    "dim": row.dim,
                    "target_mpp": row.target_mpp,
                    "tile_px": row.tile_px,
                    "grid_source": _summary(parts),
                    "grid_sources": parts,
                    "indexed_slides": progress.get(row.id, {}).get(INDEXED, 0),
                    "progress": progress.get(row.id) or _empty_progress(s),
                }
            )
        return out


def _empty_progress(session) -> dict:
    total = session.scalar(sa.select(sa.func.count(Slide.id)))
    missing = session.scalar(sa.select(sa.func.count(Slide.id)).where(Slide.status == MISSING))
    failed = session.scalar(sa.select(sa.func.count(Slide.id)).where(Slide.status == FAILED))
    return {INDEXED: 0, PENDING: total - missing - failed, FAILED: failed, MISSING: missing, "tiles": 0}


def encoder_progress(session) -> dict[int, dict]:
    """Per encoder id, how far it has come over the archive's slides, each counted once:
    `indexed` (in its search), `missing` (file gone: out of every search), `failed` (it
    failed, or the file cannot be read), `pending` (the rest: `indexer build` with it indexes
    them), and `tiles` of its indexed slides. One statement for all encoders."""
    enc = sa.select(EncoderRecord.id.label("encoder_id")).subquery()
    se = aliased(SlideEncoding)
    rows = session.execute(
        sa.select(enc.c.encoder_id, Slide.status, se.status, sa.func.count(Slide.id), sa.func.sum(se.tile_count))
        .select_from(enc)
        .join(Slide, sa.true())
        .outerjoin(se, sa.and_(se.slide_id == Slide.id, se.encoder_id == enc.c.encoder_id))
        .group_by(enc.c.encoder_id, Slide.status, se.status)
    ).all()
    out: dict[int, dict] = {}
    for encoder_id, slide_status, enc_status, n, tiles in rows:
        p = out.setdefault(encoder_id, {INDEXED: 0, PENDING: 0, FAILED: 0, MISSING: 0, "tiles": 0})
        if slide_status == MISSING:
            key = MISSING
        elif enc_status == INDEXED:
            key = INDEXED
            p["tiles"] += int(tiles or 0)
        elif enc_status == FAILED or (enc_status is None and slide_status == FAILED):
            key = FAILED
        else:
            key = PENDING
        p[key] += n
    return out


def _summary(parts: dict) -> str:
    if not parts:
        return "unknown"
    return "override" if "override" in parts.values() else "encoder"


def _brief(grid: dict | None) -> dict | None:
    if grid is None:
        return None
    return {k: grid[k] for k in ("id", "name", "target_mpp", "tile_px", "grid_source")}
