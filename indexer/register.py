"""Bringing the catalog in line with an archive before any slide is embedded: repairing what
an interrupted run left, registering new slides as pending, following moved files, and
replacing changed ones. Runs on rank 0 only, in one transaction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from engine.catalog.models import FAILED, INDEXED, PENDING, Encoder, Shard, Slide, Tile
from engine.encoder import EncoderInfo
from engine.errors import ConfigError
from engine.shards import ShardEncoder, encoder_dir, list_shards, sidecar_of
from indexer.discovery import SlideFile
from indexer.metadata import CATALOG_COLUMNS


@dataclasses.dataclass
class Registration:
    """What registration found; `jobs` are the slides to (re-)index: (id, path, bytes)."""

    jobs: list[tuple[int, str, int]] = dataclasses.field(default_factory=list)
    already_indexed: int = 0
    new: int = 0
    moved: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    replaced: list[str] = dataclasses.field(default_factory=list)
    duplicates: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    repaired: list[str] = dataclasses.field(default_factory=list)
    files_to_delete: list[Path] = dataclasses.field(default_factory=list)


def encoder_row(session: Session, info: EncoderInfo, shard_encoder: ShardEncoder) -> Encoder:
    """The catalog row of this encoder + grid, created on first use."""
    row = session.scalar(
        sa.select(Encoder).where(
            Encoder.checkpoint_sha256 == info.checkpoint_sha256,
            Encoder.target_mpp == shard_encoder.target_mpp,
            Encoder.tile_px == shard_encoder.tile_px,
        )
    )
    if row is None:
        row = Encoder(
            name=info.name,
            architecture=info.architecture,
            checkpoint_sha256=info.checkpoint_sha256,
            dim=info.dim,
            target_mpp=shard_encoder.target_mpp,
            tile_px=shard_encoder.tile_px,
            normalisation=info.normalisation,
            is_random=info.is_random,
        )
        session.add(row)
        session.flush()
    return row


def check_one_encoder(session: Session, encoder: Encoder) -> None:
    """A slide has one status, so a catalog is indexed with one encoder + grid."""
    other = session.execute(
        sa.select(Encoder.name, Encoder.checkpoint_sha256, Encoder.target_mpp, Encoder.tile_px, sa.func.count(Slide.id))
        .join(Slide, Slide.encoder_id == Encoder.id)
        .where(Slide.status == INDEXED, Encoder.id != encoder.id)
        .group_by(Encoder.id)
    ).first()
    if other is not None:
        name, sha, mpp, px, n = other
        raise ConfigError(
            f"this catalog holds {n} slides indexed with encoder {name} (sha256 {sha[:12]}, {mpp:g} um/px, {px} px), "
            f"not the one given ({encoder.name}, sha256 {encoder.checkpoint_sha256[:12]}, {encoder.target_mpp:g} um/px, "
            f"{encoder.tile_px} px); use another --catalog and --index-dir for another encoder"
        )


def drop_slide_vectors(session: Session, slide: Slide, index_dir: Path) -> list[Path]:
    """Delete a slide's tiles and shard rows (in the session); returns the shard files to
    delete once the transaction is committed."""
    shard_ids = session.scalars(sa.select(Tile.shard_id).where(Tile.slide_id == slide.id).distinct()).all()
    session.execute(sa.delete(Tile).where(Tile.slide_id == slide.id))
    files = []
    for shard in session.scalars(sa.select(Shard).where(Shard.id.in_([i for i in shard_ids if i is not None]))):
        files += [index_dir / shard.path, sidecar_of(index_dir / shard.path)]
        session.delete(shard)
    slide.tile_count = 0
    return files


def repair(session: Session, index_dir: Path, shard_encoder: ShardEncoder, encoder: Encoder, reg: Registration) -> None:
    """Undo what a killed run may have left: shard files without a catalog row (written, then
    killed before the commit), temp files, and catalog shards whose file vanished."""
    folder = encoder_dir(index_dir, shard_encoder)
    known = set(session.scalars(sa.select(Shard.path).where(Shard.encoder_id == encoder.id)))
    # engine.files.atomic_output's temp files: `.NAME.PID.tmp.faiss` / `.tmp.json` (and the
    # older `.NAME.faiss.PID.tmp`); only temp files start with a dot there.
    reg.files_to_delete += folder.glob(".*.tmp*") if folder.is_dir() else []
    for file in list_shards(index_dir, shard_encoder):
        if not file.name.startswith(".") and file.relative_to(index_dir).as_posix() not in known:
            reg.files_to_delete += [file, sidecar_of(file)]
            reg.repaired.append(f"removed shard file {file.name} that no catalog row references")
    for shard in session.scalars(sa.select(Shard).where(Shard.encoder_id == encoder.id)):
        if not (index_dir / shard.path).is_file():
            slide_ids = session.scalars(sa.select(Tile.slide_id).where(Tile.shard_id == shard.id).distinct()).all()
            for slide in session.scalars(sa.select(Slide).where(Slide.id.in_(slide_ids))):
                reg.files_to_delete += drop_slide_vectors(session, slide, index_dir)
                slide.status, slide.error = PENDING, None
                reg.repaired.append(f"{slide.path}: its shard file {shard.path} is gone; indexing it again")


def _apply_metadata(slide: Slide, fields: dict | None, collection: str | None) -> None:
    if fields:
        for name in CATALOG_COLUMNS:
            if name in fields:
                setattr(slide, name, fields[name])
        slide.extra = dict(fields.get("extra") or {})
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
) -> Registration:
    """Register the archive's slide files; returns the slides to index."""
    reg = Registration()
    root_prefix = str(root.absolute()).rstrip("/") + "/"
    present = {f.fingerprint for f in files}
    by_fp = {s.fingerprint: s for s in session.scalars(sa.select(Slide).where(Slide.fingerprint.in_(present)))} if present else {}
    under_root = {s.path: s for s in session.scalars(sa.select(Slide).where(Slide.path.startswith(root_prefix, autoescape=True)))}
    seen: dict[str, str] = {}
    chosen: list[tuple[SlideFile, Slide]] = []
    replaced_paths: set[str] = set()
    for f in files:
        path = str(f.path)
        if f.fingerprint in seen:
            reg.duplicates.append((f.relpath, seen[f.fingerprint]))
            continue
        seen[f.fingerprint] = f.relpath
        slide = by_fp.get(f.fingerprint)
        if slide is None:
            old = under_root.get(path)
            if old is not None and old.fingerprint not in present:
                # Same path, new content: the old slide is replaced by the file's new content.
                reg.files_to_delete += drop_slide_vectors(session, old, index_dir)
                session.delete(old)
                session.flush()
                reg.replaced.append(f.relpath)
                replaced_paths.add(path)
            slide = Slide(path=path, fingerprint=f.fingerprint, status=PENDING, tile_count=0, extra={})
            session.add(slide)
            reg.new += 1
        elif slide.path != path:
            reg.moved.append((slide.path, path))
            slide.path = path
        _apply_metadata(slide, metadata.get(f.relpath), collection)
        if f.read_error:
            slide.status, slide.error = FAILED, f.read_error
        elif slide.status == INDEXED:
            reg.already_indexed += 1
        chosen.append((f, slide))
    session.flush()
    reg.jobs = [(slide.id, str(f.path), f.size_bytes) for f, slide in chosen if slide.status != INDEXED and not f.read_error]
    current = {str(f.path) for f in files}
    moved_from = {old for old, _ in reg.moved}
    reg.missing = sorted(p for p in under_root if p not in current and p not in replaced_paths and p not in moved_from)
    return reg
