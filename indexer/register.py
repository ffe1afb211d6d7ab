"""Bringing the catalog in line with an archive before any slide is embedded: repairing what
an interrupted run left, registering new slides as pending, following moved files, and
replacing changed ones. Runs on rank 0 only, in one transaction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from engine.catalog.base import utcnow
from engine.catalog.models import (
    FAILED,
    INDEXED,
    MISSING,
    PENDING,
    SHARD_QUARANTINED,
    EncoderRecord,
    Shard,
    Slide,
    SlideEncoding,
    Tile,
)
from engine.encoder import EncoderInfo
from engine.shards import (
    ShardEncoder,
    encoder_dir,
    list_orphan_sidecars,
    list_shards,
    list_temp_files,
    shard_file_bytes,
    sidecar_of,
)
from indexer.discovery import SlideFile
from indexer.metadata import CATALOG_COLUMNS
from indexer.writer import encoding_of, settle_slide


@dataclasses.dataclass
class Registration:
    """What registration found; `jobs` are the slides to (re-)index with the build's encoder:
    (id, path, bytes); `encodings`: slide id -> its SlideEncoding id for that encoder (the
    tile ids' base, indexer/writer.py)."""

    jobs: list[tuple[int, str, int]] = dataclasses.field(default_factory=list)
    encodings: dict[int, int] = dataclasses.field(default_factory=dict)
    already_indexed: int = 0
    new: int = 0
    moved: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    replaced: list[str] = dataclasses.field(default_factory=list)
    duplicates: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)  # marked MISSING in this run
    back: list[str] = dataclasses.field(default_factory=list)  # MISSING slides whose file is back
    repaired: list[str] = dataclasses.field(default_factory=list)
    files_to_delete: list[Path] = dataclasses.field(default_factory=list)


def encoder_row(
    session: Session, info: EncoderInfo, shard_encoder: ShardEncoder, spec: str | None = None
) -> EncoderRecord:
    """The catalog row of this encoder + grid, created on first use; `spec` (canonical, see
    engine.search.which_encoder) is recorded on a new row and on a row that has none yet."""
    row = session.scalar(
        sa.select(EncoderRecord).where(
            EncoderRecord.checkpoint_sha256 == info.checkpoint_sha256,
            EncoderRecord.target_mpp == shard_encoder.target_mpp,
            EncoderRecord.tile_px == shard_encoder.tile_px,
        )
    )
    if row is None:
        row = EncoderRecord(
            name=info.name,
            architecture=info.architecture,
            checkpoint_sha256=info.checkpoint_sha256,
            dim=info.dim,
            target_mpp=shard_encoder.target_mpp,
            tile_px=shard_encoder.tile_px,
            normalisation=info.normalisation,
            is_random=info.is_random,
            spec=spec,
        )
        session.add(row)
        session.flush()
    elif spec and not row.spec:
        row.spec = spec
    return row


def drop_slide_vectors(session: Session, slide: Slide, index_dir: Path, *, encoder_id: int | None = None) -> list[Path]:
    """Delete a slide's tiles and shard rows of one encoder (`encoder_id`), or of every
    encoder (None: the file changed or went), in the session, and set those encodings
    pending; returns the shard files to delete once the transaction is committed."""
    which = Tile.slide_id == slide.id
    encodings = sa.select(SlideEncoding).where(SlideEncoding.slide_id == slide.id)
    if encoder_id is not None:
        encodings = encodings.where(SlideEncoding.encoder_id == encoder_id)
        mine = sa.select(SlideEncoding.id).where(
            SlideEncoding.slide_id == slide.id, SlideEncoding.encoder_id == encoder_id
        )
        which = sa.and_(which, Tile.encoding_id.in_(mine))
    shard_ids = session.scalars(sa.select(Tile.shard_id).where(which).distinct()).all()
    session.execute(sa.delete(Tile).where(which))
    files = []
    for shard in session.scalars(sa.select(Shard).where(Shard.id.in_([i for i in shard_ids if i is not None]))):
        files += [index_dir / shard.path, sidecar_of(index_dir / shard.path)]
        session.delete(shard)
    for row in session.scalars(encodings):
        row.status, row.error, row.tile_count = PENDING, None, 0
    return files


def repair(
    session: Session,
    index_dir: Path,
    shard_encoder: ShardEncoder,
    encoder: EncoderRecord,
    reg: Registration,
    *,
    other_builds: Callable[[], list[str]] | None = None,
) -> None:
    """Undo what a killed run may have left and what `indexer verify` or a search found
    damaged: shard files without a catalog row (written, then killed before the commit),
    temp files and orphan sidecars, and catalog shards whose file vanished, has the wrong
    size or was quarantined (their slides are embedded again).

    `other_builds()` names the other live builds on this index folder (indexer/lease.py).
    It is asked after the folder was listed, in a transaction of its own, so a build whose
    file is in the listing had its lease committed before the question: while any is live,
    files no row references may be its work in progress and are left alone."""
    folder = encoder_dir(index_dir, shard_encoder)
    known = set(session.scalars(sa.select(Shard.path).where(Shard.encoder_id == encoder.id)))
    strays = list_temp_files(index_dir, shard_encoder) + list_orphan_sidecars(index_dir, shard_encoder)
    orphans = [f for f in list_shards(index_dir, shard_encoder) if f.relative_to(index_dir).as_posix() not in known]
    others = other_builds() if other_builds is not None and (strays or orphans) else []
    if others:
        reg.repaired.append(
            f"{len(orphans)} shard file(s) and {len(strays)} temp/sidecar file(s) in {folder} that no catalog row references are left alone: "
            f"another build is running on this index ({', '.join(others)}); a later build removes them if they stay unreferenced"
        )
    else:
        reg.files_to_delete += strays
        for file in orphans:
            reg.files_to_delete += [file, sidecar_of(file)]
            reg.repaired.append(f"removed shard file {file.name} that no catalog row references")
    for shard in session.scalars(sa.select(Shard).where(Shard.encoder_id == encoder.id)):
        file = index_dir / shard.path
        why = None
        if shard.status == SHARD_QUARANTINED:
            why = f"its shard file {shard.path} was quarantined ({shard.error or 'damaged'})"
        elif not file.is_file():
            why = f"its shard file {shard.path} is gone"
        elif (size := file.stat().st_size) != (expected := shard_file_bytes(shard.count, encoder.dim)):
            # one stat per shard: catches truncated or padded files; flipped bytes need the
            # checksum, which `indexer verify` and search check (and then quarantine)
            why = f"its shard file {shard.path} has {size} bytes, {expected} expected"
        if why is None:
            continue
        slide_ids = session.scalars(sa.select(Tile.slide_id).where(Tile.shard_id == shard.id).distinct()).all()
        slides = session.scalars(sa.select(Slide).where(Slide.id.in_(slide_ids))).all()
        for slide in slides:
            reg.files_to_delete += drop_slide_vectors(session, slide, index_dir, encoder_id=encoder.id)
            settle_slide(session, slide)
            reg.repaired.append(f"{slide.path}: {why}; indexing it again")
        if not slides and shard in session:  # a shard row no tile points to
            reg.files_to_delete += [file, sidecar_of(file)]
            session.delete(shard)
            reg.repaired.append(f"dropped shard row {shard.path} ({why}) that no tile uses")


def _apply_metadata(slide: Slide, fields: dict | None, collection: str | None) -> None:
    if fields:
        for name in CATALOG_COLUMNS:
            if name in fields:
                setattr(slide, name, fields[name])
        # merged: a build given only some of the metadata files keeps what the others gave
        slide.extra = {**(slide.extra or {}), **(fields.get("extra") or {})}
    if collection and not slide.collection:
        slide.collection = collection


def register(
    session: Session,
    root: Path,
    files: list[SlideFile],
    *,
    index_dir: Path,
    metadata: dict[str, dict],
    collection: str | None,
    encoder_id: int | None = None,
) -> Registration:
    """Register the archive's slide files; returns the slides to index with the encoder
    `encoder_id` (those it has not indexed; None: those no encoder has), each with its
    pending SlideEncoding row for it made here.

    A catalog slide is its content (fingerprint), so for each slide under `root`:
    - its content is at its path: nothing changes (the same content at other paths too is a
      duplicate, not a move: the slide stays where it is);
    - its content is at another path only: a move (the path is updated, vectors kept);
    - its path holds other content and its own content is nowhere: the file changed; the
      slide row and its vectors of every encoder go, the new content is registered like any
      new file;
    - its content is nowhere and its path is gone or unreadable: MISSING; it keeps its
      tiles and vectors of every encoder (a share that was not mounted must not cost a re-embedding of the
      archive) but search leaves it out, and it is indexed again when the file is back.
    So one path never has two slide rows."""
    reg = Registration()
    root_prefix = str(root.absolute()).rstrip("/") + "/"
    present = {f.fingerprint for f in files if not f.read_error}
    by_fp = {}
    for part in _chunks(sorted(present)):
        by_fp.update({s.fingerprint: s for s in session.scalars(sa.select(Slide).where(Slide.fingerprint.in_(part)))})
    under_root = {
        s.path: s for s in session.scalars(sa.select(Slide).where(Slide.path.startswith(root_prefix, autoescape=True)))
    }
    current = {str(f.path): f for f in files}
    gone_paths: set[str] = set()
    for path, old in list(under_root.items()):
        f = current.get(path)
        if f is None or f.fingerprint == old.fingerprint or old.fingerprint in present:
            continue  # not here (missing, below), unchanged, or moved/duplicated (by fingerprint, below)
        if f.read_error:
            _mark_missing(session, old, f.read_error)
            reg.missing.append(path)
        else:
            # Same path, new content: the old slide is replaced by the file's new content.
            reg.files_to_delete += drop_slide_vectors(session, old, index_dir)
            session.delete(old)
            reg.replaced.append(f.relpath)
        del under_root[path]
        gone_paths.add(path)
    session.flush()
    groups: dict[str, list[SlideFile]] = {}
    for f in files:
        if f.read_error and str(f.path) in gone_paths:
            continue  # an indexed slide's file that cannot be read now: marked missing above
        groups.setdefault(f.fingerprint, []).append(f)
    chosen: list[tuple[SlideFile, Slide]] = []
    for fp, group in groups.items():
        slide = by_fp.get(fp)
        # the file at the slide's own path, when it is among them, stays the slide
        f = next((g for g in group if slide is not None and str(g.path) == slide.path), group[0])
        reg.duplicates += [(g.relpath, f.relpath) for g in group if g is not f]
        path = str(f.path)
        if slide is None:
            slide = Slide(path=path, fingerprint=fp, status=PENDING, extra={})
            session.add(slide)
            reg.new += 1
        elif slide.path != path:
            reg.moved.append((slide.path, path))
            slide.path = path
        if slide.status == MISSING:
            reg.files_to_delete += _unmark_missing(session, slide, index_dir)
            reg.back.append(f.relpath)
        _apply_metadata(slide, metadata.get(f.relpath), collection)
        if f.read_error:
            slide.status, slide.error = FAILED, f.read_error
        chosen.append((f, slide))
    session.flush()
    done = _indexed_with(session, [slide.id for _, slide in chosen], encoder_id)
    for f, slide in chosen:
        if f.read_error:
            continue
        if slide.id in done:
            reg.already_indexed += 1
            continue
        reg.jobs.append((slide.id, str(f.path), f.size_bytes))
        if encoder_id is not None:
            reg.encodings[slide.id] = encoding_of(session, slide.id, encoder_id).id
    moved_from = {old for old, _ in reg.moved}
    for path, slide in under_root.items():
        if path not in current and path not in moved_from and slide.status != MISSING:
            _mark_missing(session, slide, "the file is not in the archive any more")
            reg.missing.append(path)
    reg.missing.sort()
    return reg


def _indexed_with(session: Session, slide_ids: list[int], encoder_id: int | None) -> set[int]:
    """Those of `slide_ids` indexed with the encoder (None: with any)."""
    q = sa.select(SlideEncoding.slide_id).where(SlideEncoding.status == INDEXED)
    if encoder_id is not None:
        q = q.where(SlideEncoding.encoder_id == encoder_id)
    found: set[int] = set()
    for part in _chunks(sorted(slide_ids)):
        found.update(session.scalars(q.where(SlideEncoding.slide_id.in_(part))))
    return found


def _touch_shards(session: Session, slide: Slide) -> None:
    """Bump the updated_at of a slide's shards: its place in search changed (missing or
    back), and running search servers refresh when the shards' newest updated_at moves."""
    shard_ids = sa.select(Tile.shard_id).where(Tile.slide_id == slide.id).distinct().scalar_subquery()
    session.execute(sa.update(Shard).where(Shard.id.in_(shard_ids)).values(updated_at=utcnow()))


def _mark_missing(session: Session, slide: Slide, why: str) -> None:
    """The slide's file is gone or unreadable: out of search (engine/search/live_index.py searches only
    indexed slides), tiles and vectors kept for when it comes back."""
    slide.status = MISSING
    slide.error = f"{why} ({slide.path}); restore it or `indexer remove {slide.id}`"
    _touch_shards(session, slide)


def _unmark_missing(session: Session, slide: Slide, index_dir: Path) -> list[Path]:
    """A missing slide's file is back: each encoder's vectors count again when they were kept
    whole, else that encoder indexes it again; the slide's status follows (settle_slide)."""
    files: list[Path] = []
    have = dict(
        session.execute(
            sa.select(Tile.encoding_id, sa.func.count(Tile.id))
            .where(Tile.slide_id == slide.id)
            .group_by(Tile.encoding_id)
        ).all()
    )
    for row in session.scalars(sa.select(SlideEncoding).where(SlideEncoding.slide_id == slide.id)):
        if row.status == INDEXED and not (have.get(row.id) and have[row.id] == row.tile_count):
            files += drop_slide_vectors(session, slide, index_dir, encoder_id=row.encoder_id)
    slide.status, slide.error = PENDING, None
    settle_slide(session, slide)
    _touch_shards(session, slide)
    return files


def _chunks(values: list, size: int = 900):
    for i in range(0, len(values), size):
        yield values[i : i + size]
