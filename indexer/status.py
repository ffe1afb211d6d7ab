"""`indexer status`: what the catalog says about each slide."""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import SLIDE_STATUSES, Slide
from engine.errors import ConfigError


def slide_statuses(catalog: Catalog, status: str | None = None) -> list[dict]:
    """One dict per slide (id, path, status, tiles, error, mpp, mpp_source, patient,
    collection, site, diagnosis, label, extra), ordered by id; only slides of `status` when given."""
    if status is not None and status not in SLIDE_STATUSES:
        raise ConfigError(f"status must be one of {', '.join(SLIDE_STATUSES)}, not {status!r}")
    query = sa.select(Slide).order_by(Slide.id)
    if status is not None:
        query = query.where(Slide.status == status)
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
            }
            for sl in s.scalars(query)
        ]


def status_counts(rows: list[dict]) -> dict[str, int]:
    counts = Counter(r["status"] for r in rows)
    out = {name: counts.get(name, 0) for name in SLIDE_STATUSES}
    out["tiles"] = sum(r["tiles"] or 0 for r in rows)
    return out
