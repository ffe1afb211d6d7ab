"""`indexer remove`: drop slides from the catalog and their vectors from the index."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import Slide
from engine.errors import NotFound
from indexer.register import drop_slide_vectors


def _find(session, ref: str) -> Slide | None:
    """A slide by id, fingerprint, or path (as stored, or resolved from here)."""
    if ref.isdigit():
        slide = session.get(Slide, int(ref))
        if slide is not None:
            return slide
    slide = session.scalar(sa.select(Slide).where(Slide.fingerprint == ref))
    if slide is not None:
        return slide
    for candidate in (ref, str(Path(ref).absolute())):
        slide = session.scalar(sa.select(Slide).where(Slide.path == candidate))
        if slide is not None:
            return slide
    return None


def remove_slides(catalog: Catalog, index_dir: str | Path, refs: list[str]) -> list[str]:
    """Remove the slides named by `refs` (ids, paths or fingerprints), their tiles and
    shard files; all or none: an unknown ref raises NotFound before anything changes.
    Returns the removed slides' paths."""
    index_dir = Path(index_dir)
    files: list[Path] = []
    removed = []
    with catalog.session() as s:
        slides = []
        for ref in refs:
            slide = _find(s, ref)
            if slide is None:
                raise NotFound(
                    f"no slide {ref!r} in the catalog (give an id, a path or a fingerprint; `indexer status` lists them)"
                )
            slides.append(slide)
        for slide in {sl.id: sl for sl in slides}.values():
            files += drop_slide_vectors(s, slide, index_dir)
            removed.append(slide.path)
            s.delete(slide)
    # Shard files go after the commit: a kill in between leaves orphan files, which
    # `indexer verify` reports and the next build deletes.
    for file in files:
        file.unlink(missing_ok=True)
    return removed
