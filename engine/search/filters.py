"""The slide fields a search can be narrowed by, and the tile-id filter the index applies.

FILTER_FIELDS is the one list of them: the web forms, the API schema, the archive's filter
menus and the CLI's options are all made from it, so a field added here is offered
everywhere and one not listed is refused everywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import sqlalchemy as sa

from engine.catalog.models import INDEXED, Slide, Tile, tile_of_encoder
from engine.errors import QueryError

if TYPE_CHECKING:
    from engine.index import IdFilter

# exact-match columns of engine.catalog.models.Slide
FILTER_FIELDS = ("site", "diagnosis", "collection", "label")


def clean_filters(filters: dict | None) -> dict[str, str]:
    """The filters that say something (empty values dropped); a QueryError for a field
    that is not one of FILTER_FIELDS."""
    filters = {k: v for k, v in (filters or {}).items() if v not in (None, "")}
    unknown = set(filters) - set(FILTER_FIELDS)
    if unknown:
        raise QueryError(f"unknown filter fields {sorted(unknown)}; use {', '.join(FILTER_FIELDS)}")
    return filters


def id_filter(
    session,
    encoder_id: int,
    filters: dict | None,
    exclude_slide_id: int | None = None,
    exclude_patient: str | None = None,
) -> IdFilter | None:
    """The index's filter for a search: with `filters`, the tiles of `encoder_id` of the
    indexed slides that match them all (an allow list); otherwise the tiles of the excluded slide and patient
    (a deny list), or None when nothing is left out. One SQL statement."""
    from engine.index import IdFilter  # FAISS: loaded by searching, not by reading FILTER_FIELDS

    filters = clean_filters(filters)
    excluded = []
    if exclude_slide_id is not None:
        excluded.append(Slide.id == int(exclude_slide_id))
    if exclude_patient:
        excluded.append(Slide.patient == exclude_patient)
    if filters:
        q = sa.select(Tile.id).join(Slide, Slide.id == Tile.slide_id)
        q = q.where(Slide.status == INDEXED, tile_of_encoder(encoder_id))
        for field, value in filters.items():
            q = q.where(getattr(Slide, field) == value)
        if excluded:
            # NOT IN over ids (never NULL): a slide without a patient stays allowed
            q = q.where(Slide.id.not_in(sa.select(Slide.id).where(sa.or_(*excluded))))
        return IdFilter(include=np.array(session.scalars(q).all(), np.int64))
    if not excluded:
        return None
    q = sa.select(Tile.id).join(Slide, Slide.id == Tile.slide_id).where(sa.or_(*excluded))
    return IdFilter(exclude=np.array(session.scalars(q).all(), np.int64))
