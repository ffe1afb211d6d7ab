"""Catalog queries for the archive and benchmark pages and their JSON twins."""

from __future__ import annotations

import dataclasses
import math

import sqlalchemy as sa

from engine.catalog import Catalog, models
from engine.errors import NotFound
from engine.search.filters import FILTER_FIELDS


@dataclasses.dataclass
class Page:
    items: list
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))


def slide_json(row: models.Slide) -> dict:
    return {
        "id": row.id,
        "name": row.path.replace("\\", "/").rsplit("/", 1)[-1],
        "path": row.path,
        "status": row.status,
        "error": row.error,
        "patient": row.patient,
        "site": row.site,
        "diagnosis": row.diagnosis,
        "label": row.label,
        "collection": row.collection,
        "extra": row.extra or {},
        "mpp": row.mpp,
        "mpp_source": row.mpp_source,
        "width": row.width,
        "height": row.height,
        "vendor": row.vendor,
        "tile_count": row.tile_count,
        "indexed_at": row.indexed_at.isoformat() if row.indexed_at else None,
    }


def escape_like(text: str) -> str:
    """`text` for a LIKE pattern ESCAPE '\\' that matches it literally."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_slides(
    catalog: Catalog, *, status=None, q=None, site=None, diagnosis=None, collection=None, page=1, per_page=50
) -> Page:
    if status is not None and status not in models.SLIDE_STATUSES:
        raise ValueError(f"status must be one of {', '.join(models.SLIDE_STATUSES)}")
    query = sa.select(models.Slide)
    if status:
        query = query.where(models.Slide.status == status)
    for column, value in (
        (models.Slide.site, site),
        (models.Slide.diagnosis, diagnosis),
        (models.Slide.collection, collection),
    ):
        if value:
            query = query.where(column == value)
    if q:
        # q is text to find, not a pattern: % and _ in it are escaped (q=_ matched every slide)
        like = "%" + escape_like(q.lower()) + "%"
        query = query.where(
            sa.or_(
                *(
                    sa.func.lower(c).like(like, escape="\\")
                    for c in (models.Slide.path, models.Slide.patient, models.Slide.label, models.Slide.diagnosis)
                )
            )
        )
    with catalog.session() as s:
        total = s.scalar(sa.select(sa.func.count()).select_from(query.subquery()))
        rows = s.scalars(query.order_by(models.Slide.id).offset((page - 1) * per_page).limit(per_page)).all()
    return Page(items=list(rows), total=total or 0, page=page, per_page=per_page)


def _get(catalog: Catalog, model, row_id: int, missing: str):
    """The row of `model` with this id, or NotFound(missing) (a 404 at the edge)."""
    with catalog.session() as s:
        row = s.get(model, row_id)
    if row is None:
        raise NotFound(missing)
    return row


def get_slide(catalog: Catalog, slide_id: int) -> models.Slide:
    return _get(catalog, models.Slide, slide_id, f"no slide with id {slide_id} in the archive")


def indexed_slides(catalog: Catalog) -> list[models.Slide]:
    with catalog.session() as s:
        return list(
            s.scalars(sa.select(models.Slide).where(models.Slide.status == models.INDEXED).order_by(models.Slide.path))
        )


def filter_choices(catalog: Catalog) -> dict[str, list[str]]:
    """Distinct values of each search filter field (site, diagnosis, ...) in the catalog,
    for the filter menus."""
    choices = {}
    with catalog.session() as s:
        for name in FILTER_FIELDS:
            column = getattr(models.Slide, name)
            choices[name] = [
                v for v in s.scalars(sa.select(column).where(column.is_not(None)).distinct().order_by(column)) if v
            ]
    return choices


def status_counts(catalog: Catalog) -> dict[str, int]:
    with catalog.session() as s:
        rows = s.execute(sa.select(models.Slide.status, sa.func.count()).group_by(models.Slide.status)).all()
    return {status: count for status, count in rows}


def benchmark_json(row: models.BenchmarkRun) -> dict:
    return {
        "id": row.id,
        "dataset_kind": row.dataset_kind,
        "dataset_path": row.dataset_path,
        "encoder_name": row.encoder_name,
        "encoder_sha256": row.encoder_sha256,
        "parameters": row.parameters or {},
        "metrics": row.metrics or {},
        "created_at": row.created_at.isoformat() if row.created_at else None,
    }


def list_benchmarks(catalog: Catalog) -> list[models.BenchmarkRun]:
    with catalog.session() as s:
        return list(
            s.scalars(
                sa.select(models.BenchmarkRun).order_by(
                    models.BenchmarkRun.created_at.desc(), models.BenchmarkRun.id.desc()
                )
            )
        )


def get_benchmark(catalog: Catalog, run_id: int) -> models.BenchmarkRun:
    return _get(catalog, models.BenchmarkRun, run_id, f"no benchmark run with id {run_id}")


def audit_events(catalog: Catalog, limit: int = 200) -> list[tuple[models.AuditEvent, str | None]]:
    with catalog.session() as s:
        rows = s.execute(
            sa.select(models.AuditEvent, models.User.username)
            .outerjoin(models.User, models.User.id == models.AuditEvent.user_id)
            .order_by(models.AuditEvent.id.desc())
            .limit(limit)
        ).all()
    return [(event, username) for event, username in rows]
