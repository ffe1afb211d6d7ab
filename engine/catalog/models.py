"""Typed catalog models. Ids of `Tile` are the FAISS ids of their vectors."""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy import false as sa_false
from sqlalchemy.orm import Mapped, column_property, mapped_column, relationship

from engine.catalog.base import Base, BigId, JsonDoc, utcnow

# Status values. A slide's embedding by one encoder (SlideEncoding.status) is PENDING,
# INDEXED or FAILED. The slide row's own status (Slide.status) is about the slide as a whole:
# MISSING: the file at `path` is gone or no longer has the slide's fingerprint; the vectors
# of every encoder are kept but left out of search until `indexer build` settles it (a file,
# not an encoder, matter: it lives on the slide only). FAILED: the file cannot be read, or no
# encoder could index it. INDEXED: present and indexed by at least one encoder. PENDING: by
# none yet. The indexer keeps it in step with the encodings (indexer/writer.py).
PENDING, INDEXED, FAILED, MISSING = "pending", "indexed", "failed", "missing"
SLIDE_STATUSES = (PENDING, INDEXED, FAILED, MISSING)
ENCODING_STATUSES = (PENDING, INDEXED, FAILED)

# Shard.status values. QUARANTINED: the file failed its checksum or would not load; search
# answers from the other shards and `indexer build` re-embeds the slides it held.
SHARD_OK, SHARD_QUARANTINED = "ok", "quarantined"

# Ids of slides and shards are never reused (SQLite AUTOINCREMENT; sequences on PostgreSQL):
# caches in long-running workers are keyed by them, and a reused id would show one slide's
# pixels under another's name. Tile ids are derived from the encoding id (SlideEncoding), so
# they inherit this.
_NO_ID_REUSE = {"sqlite_autoincrement": True}
# The largest id of an INTEGER key (slides, shards, runs, users: 32-bit on PostgreSQL). Tile
# ids are BIGINT but are never named in URLs or requests; anything larger names no row.
MAX_ROW_ID = 2**31 - 1


class EncoderRecord(Base):
    """An embedding model as used for indexing: weights + the grid it embeds at."""

    __tablename__ = "encoders"
    __table_args__ = (UniqueConstraint("checkpoint_sha256", "target_mpp", "tile_px", name="uq_encoders_identity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    architecture: Mapped[str] = mapped_column(String(50))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    target_mpp: Mapped[float] = mapped_column(Float)
    tile_px: Mapped[int] = mapped_column(Integer)
    normalisation: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    is_random: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # what loads the encoder again (engine.search.which_encoder): ``random:ARCH:SEED``, an
    # absolute checkpoint or card path, or ``preset:NAME:/abs/weights``; null before 0003
    spec: Mapped[Optional[str]] = mapped_column(Text)


class Slide(Base):
    """A whole-slide image of the archive, identified by the fingerprint of its content."""

    __tablename__ = "slides"
    __table_args__ = _NO_ID_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    patient: Mapped[Optional[str]] = mapped_column(String(200), index=True)
    site: Mapped[Optional[str]] = mapped_column(String(200), index=True)
    diagnosis: Mapped[Optional[str]] = mapped_column(String(200), index=True)
    label: Mapped[Optional[str]] = mapped_column(String(200), index=True)
    collection: Mapped[Optional[str]] = mapped_column(String(200), index=True)
    extra: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    mpp: Mapped[Optional[float]] = mapped_column(Float)
    mpp_source: Mapped[Optional[str]] = mapped_column(String(30))
    width: Mapped[Optional[int]] = mapped_column(Integer)
    height: Mapped[Optional[int]] = mapped_column(Integer)
    vendor: Mapped[Optional[str]] = mapped_column(String(50))
    # the slide as a whole (see the status values above); per encoder: SlideEncoding
    status: Mapped[str] = mapped_column(String(20), default=PENDING, index=True)
    error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    tiles: Mapped[list["Tile"]] = relationship(
        back_populates="slide", cascade="all, delete-orphan", passive_deletes=True
    )
    encodings: Mapped[list["SlideEncoding"]] = relationship(
        back_populates="slide", cascade="all, delete-orphan", passive_deletes=True
    )


class Shard(Base):
    """A FAISS shard file (relative to the index dir) holding vectors of one encoder."""

    __tablename__ = "shards"
    __table_args__ = _NO_ID_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    encoder_id: Mapped[int] = mapped_column(ForeignKey("encoders.id"), index=True)
    path: Mapped[str] = mapped_column(String(500), unique=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default=SHARD_OK, server_default=SHARD_OK)
    error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    encoder: Mapped[EncoderRecord] = relationship()


class SlideEncoding(Base):
    """A slide as embedded by one encoder + grid: that encoder's status, tile count and time
    for the slide (several encoders over one archive keep one row each).

    Its id gives its tiles' ids (id * TILE_ID_STRIDE + index in the slide's grid,
    indexer/writer.py), so two encoders' tiles of one slide never share an id. Catalogs from
    before migration 0004 got one row per slide with id = the slide id, so their tile ids
    (the FAISS ids in their shards) stay valid; new rows take ids from a sequence above
    those, never reused (_NO_ID_REUSE)."""

    __tablename__ = "slide_encodings"
    __table_args__ = (UniqueConstraint("slide_id", "encoder_id", name="uq_slide_encodings_slide_encoder"), _NO_ID_REUSE)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), index=True)
    encoder_id: Mapped[int] = mapped_column(ForeignKey("encoders.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), default=PENDING, index=True)
    error: Mapped[Optional[str]] = mapped_column(Text)
    tile_count: Mapped[int] = mapped_column(Integer, default=0)
    indexed_at: Mapped[Optional[dt.datetime]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    slide: Mapped[Slide] = relationship(back_populates="encodings")
    encoder: Mapped[EncoderRecord] = relationship()


def _first_indexed(column):
    """The slide's `column` in its first indexed encoding (the lowest encoder id), as a
    read-only SQL expression on Slide."""
    return (
        sa.select(column)
        .where(SlideEncoding.slide_id == Slide.id, SlideEncoding.status == INDEXED)
        .order_by(SlideEncoding.encoder_id)
        .limit(1)
        .correlate_except(SlideEncoding)
        .scalar_subquery()
    )


# Read-only views for readers of one encoder per catalog (MIL, pretraining, the archive
# page): the slide's first indexed encoding (None / 0 when none). Writers set SlideEncoding.
Slide.encoder_id = column_property(_first_indexed(SlideEncoding.encoder_id))
Slide.tile_count = column_property(sa.func.coalesce(_first_indexed(SlideEncoding.tile_count), 0))
Slide.indexed_at = column_property(_first_indexed(SlideEncoding.indexed_at))


class Tile(Base):
    """A square tile of a slide, as level-0 coordinates (never pixels). id = FAISS id; its
    encoding (slide + encoder) says whose vectors it is (null only for rows written by hand)."""

    __tablename__ = "tiles"
    __table_args__ = (Index("ix_tiles_slide_xy", "slide_id", "x", "y"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"))
    encoding_id: Mapped[Optional[int]] = mapped_column(ForeignKey("slide_encodings.id", ondelete="CASCADE"), index=True)
    shard_id: Mapped[Optional[int]] = mapped_column(ForeignKey("shards.id"), index=True)
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)  # level-0 pixels covered by one tile edge
    tissue_fraction: Mapped[float] = mapped_column(Float)

    slide: Mapped[Slide] = relationship(back_populates="tiles")
    encoding: Mapped[Optional[SlideEncoding]] = relationship()


def tile_of_encoder(encoder_id: int):
    """SQL: the tile is one of this encoder's -- its shard is (one primary-key look-up per
    tile). With several encoders over one archive a slide has tiles of each, and every reader
    of vectors (search, MIL) must take one encoder's only."""
    return sa.exists().where(Shard.id == Tile.shard_id, Shard.encoder_id == encoder_id)


class BenchmarkRun(Base):
    """A retrieval benchmark run (Acc@k, MV@k, mMV@k, mAP@k) shown in the web app."""

    __tablename__ = "benchmark_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_kind: Mapped[str] = mapped_column(String(50))
    dataset_path: Mapped[str] = mapped_column(Text)
    encoder_name: Mapped[str] = mapped_column(String(200))
    encoder_sha256: Mapped[Optional[str]] = mapped_column(String(64))
    parameters: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    plot_path: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class User(Base):
    """A web app user; passwords and API tokens are stored hashed only."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True)
    password_hash: Mapped[str] = mapped_column(String(300))
    api_token_hash: Mapped[Optional[str]] = mapped_column(String(128), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Bumped by logout, password change and `users revoke`: a session cookie carries the
    # version it was issued under and is refused once it differs.
    session_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Who searched (or viewed) what, and when."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    action: Mapped[str] = mapped_column(String(50))
    detail: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class BuildLease(Base):
    """A live `indexer build` on this catalog: its start-up repair and its writes never touch
    files another live build announced. A lease whose heartbeat is older than its timeout
    belongs to a build that died; its files are orphans the next build may repair."""

    __tablename__ = "build_leases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), unique=True)  # host:pid:random, also the prefix of its shard files
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    index_dir: Mapped[str] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class LoginThrottle(Base):
    """Failed logins per key (a user name at an address, or an address) in the current
    window, counted with one atomic UPDATE so concurrent tries cannot all slip under the
    limit; one row per key, however many tries."""

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    window_start: Mapped[dt.datetime] = mapped_column()
    failures: Mapped[int] = mapped_column(Integer, default=0)
