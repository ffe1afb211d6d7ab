"""`indexer status`: what the catalog says about each slide, and the grid (um/px, tile px)
each encoder indexed at, with whether that grid is the encoder's own or an override."""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import INDEXED, SLIDE_STATUSES, EncoderRecord, Slide
from engine.errors import ConfigError


def slide_statuses(catalog: Catalog, status: str | None = None) -> list[dict]:
    """One dict per slide (id, path, status, tiles, error, mpp, mpp_source, patient,
    collection, site, diagnosis, label, extra, and `encoder`: the encoder + grid it was indexed
    with as in `encoder_grids`, or None), ordered by id; only slides of `status` when given."""
    if status is not None and status not in SLIDE_STATUSES:
        raise ConfigError(f"status must be one of {', '.join(SLIDE_STATUSES)}, not {status!r}")
    query = sa.select(Slide).order_by(Slide.id)
    if status is not None:
        query = query.where(Slide.status == status)
    grids = {g["id"]: g for g in encoder_grids(catalog)}
    with catalog.session() as s:
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
    part came from where."""
    with catalog.session() as s:
        counts = dict(
            s.execute(
                sa.select(Slide.encoder_id, sa.func.count(Slide.id))
                .where(Slide.status == INDEXED)
                .group_by(Slide.encoder_id)
            ).all()
        )
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
                    "indexed_slides": counts.get(row.id, 0),
                }
            )
        return out


def _summary(parts: dict) -> str:
    if not parts:
        return "unknown"
    return "override" if "override" in parts.values() else "encoder"


def _brief(grid: dict | None) -> dict | None:
    if grid is None:
        return None
    return {k: grid[k] for k in ("id", "name", "target_mpp", "tile_px", "grid_source")}
