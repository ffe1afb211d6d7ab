"""The search index of one encoder, kept in step with the catalog: which encoder record the
query encoder belongs to, which shards are searched, and which are quarantined.

Only shards whose slides are all indexed are searched: a slide marked missing (its file is
gone or changed, see `indexer build`) leaves search with its shard. A shard that fails its
checks on loading (sha256 of the catalog, readable, unit vectors) is quarantined in the
catalog with the reason and left out, so search answers from the others and says so
(`warnings`, shown in every result); it is not tried again until the catalog has another
version of it (`indexer build` re-embeds its slides).

A web server's threads search one engine while a refresh may change its index in place:
index reads (search, vectors) and index changes take turns under one lock, which covers
nothing else (no SQL, no embedding, no ranking), so a slow catalog never holds up a search.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from engine.catalog.base import utcnow
from engine.catalog.db import Catalog
from engine.catalog.models import (
    INDEXED,
    MISSING,
    SHARD_OK,
    SHARD_QUARANTINED,
    EncoderRecord,
    Shard,
    Slide,
    SlideEncoding,
    Tile,
)
from engine.errors import EncoderError, NotFound
from engine.index import FLAT_MAX_TILES, IdFilter, choose_kind, open_index, sync_index
from engine.shards import ShardEncoder, encoder_dir

LOG = logging.getLogger(__name__)


def find_encoder_record(session, info, target_mpp: float, tile_px: int) -> EncoderRecord:
    """The catalog's record of the encoder `info` (an engine.encoder EncoderInfo) among
    those with shards, preferring the one on the settings' grid (`target_mpp`, `tile_px`)."""
    rows = session.scalars(
        sa.select(EncoderRecord).where(sa.exists().where(Shard.encoder_id == EncoderRecord.id))
    ).all()
    if not rows:
        raise NotFound("the archive has no indexed slides yet: index it first (`indexer build`)")
    mine = [r for r in rows if r.checkpoint_sha256 == info.checkpoint_sha256]
    if not mine:
        known = ", ".join(f"{r.name} (sha256 {r.checkpoint_sha256[:12]})" for r in rows)
        raise EncoderError(
            f"the query encoder {info.describe()} is not the one the index was built with; search with the encoder the index was built with: {known}"
        )
    same_grid = [r for r in mine if r.target_mpp == target_mpp and r.tile_px == tile_px]
    return (same_grid or mine)[0]


def quarantine(catalog: Catalog, damaged: dict[str, str]) -> None:
    """Mark damaged shards (key "path:sha256" -> reason) quarantined in the catalog, so
    `indexer verify` and `indexer build` see them. A catalog this process may not write
    (a read-only database user) only costs the record: they stay left out here."""
    try:
        with catalog.session() as s:
            for key, reason in damaged.items():
                path, sha = key.rsplit(":", 1)
                s.execute(
                    sa.update(Shard)
                    .where(Shard.path == path, Shard.sha256 == sha)
                    .values(status=SHARD_QUARANTINED, error=reason[:2000], updated_at=utcnow())
                )
    except sa.exc.SQLAlchemyError as exc:
        LOG.warning(
            "could not record quarantined shards in the catalog (%s); they stay out of this process's search", exc
        )


class LiveIndex:
    """The shard index searched for `encoder` (an engine.encoder.Encoder) over `catalog`.

    index_dir, target_mpp, tile_px: the settings' index folder and grid; kind: 'auto' (flat
    up to `flat_max` tiles, compressed above), 'flat' or 'compressed'. `refresh()` loads it."""

    def __init__(
        self,
        catalog: Catalog,
        encoder,
        index_dir: str | Path,
        target_mpp: float,
        tile_px: int,
        *,
        kind: str = "auto",
        flat_max: int = FLAT_MAX_TILES,
        use_gpu: bool = False,
        progress: bool = False,
    ):
        choose_kind(0, kind)  # validates
        self.catalog, self.encoder = catalog, encoder
        self.index_dir, self.grid = Path(index_dir), (target_mpp, tile_px)
        self.kind, self.flat_max, self.use_gpu, self.progress = kind, flat_max, use_gpu, progress
        self.index = None
        self.encoder_row: dict | None = None
        self.warnings: list[str] = []  # what search leaves out, shown in every result
        self._lock = threading.RLock()  # index reads and changes only
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._damaged: dict[int, str] = {}  # shard row ids that failed to load -> why

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, xq: np.ndarray, k: int, id_filter: IdFilter | None) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self.index.search(xq, k, id_filter)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        with self._lock:
            return self.index.vectors(ids)

    def _read_catalog(self):
        """(encoder record as a dict, its shard folder's encoder, its shards, shard ids holding tiles of slides that are
        not indexed, how many of its slides are missing)."""
        with self.catalog.session() as s:
            row = find_encoder_record(s, self.encoder.info, *self.grid)
            shards = s.execute(
                sa.select(Shard.id, Shard.path, Shard.sha256, Shard.count, Shard.status).where(
                    Shard.encoder_id == row.id
                )
            ).all()
            hidden = hidden_shards(s)
            missing = s.scalar(
                sa.select(sa.func.count(Slide.id))
                .join(SlideEncoding, SlideEncoding.slide_id == Slide.id)
                .where(Slide.status == MISSING, SlideEncoding.encoder_id == row.id)
            )
            record = {
                "id": row.id,
                "name": row.name,
                "target_mpp": row.target_mpp,
                "tile_px": row.tile_px,
                "dim": row.dim,
                "sha256": row.checkpoint_sha256,
            }
        return record, ShardEncoder.of(row), shards, hidden, missing

    def refresh(self) -> None:
        """Bring the index in step with the catalog: load new shards, drop removed ones (and
        switch between flat and compressed when the archive crossed the size threshold)."""
        with self._refresh_lock:
            row, shard_encoder, shards, hidden, missing = self._read_catalog()
            if row["dim"] != self.encoder.dim:
                raise EncoderError(f"the index holds {row['dim']}-d vectors, the encoder gives {self.encoder.dim}-d")
            quarantined = [sh for sh in shards if sh.status != SHARD_OK]
            # damaged shards are remembered by row id (never reused): a rebuilt shard is a new
            # row, and tried again even when its bytes (and sha256) are the same as before
            live = [sh for sh in shards if sh.status == SHARD_OK and sh.id not in hidden and sh.id not in self._damaged]
            files = {f"{sh.path}:{sh.sha256}": self.index_dir / sh.path for sh in live}
            checksums = {key: key.rsplit(":", 1)[1] for key in files}
            damaged: dict[str, str] = {}

            def on_error(key: str, exc: Exception) -> None:
                LOG.error("search index: leaving out %s", exc)
                damaged[key] = str(exc)

            kind = choose_kind(sum(sh.count for sh in live), self.kind, self.flat_max)
            options = {"progress": self.progress, "sha256": checksums, "on_error": on_error}
            folder = encoder_dir(self.index_dir, shard_encoder) / "compressed"
            if self.index is None or self.index.kind != kind or _swapped(self.index, folder):
                # a new index is built aside (searches go on with the old one) and swapped in;
                # also when `indexer reindex` swapped a new generation into the folder
                index = open_index(kind, row["dim"], files, folder=folder, use_gpu=self.use_gpu, **options)
                with self._lock:
                    self.index, self.encoder_row = index, row
            else:
                with self._lock:  # changed in place: no search may run meanwhile
                    sync_index(self.index, files, **options)
                    self.encoder_row = row
            row_of = {f"{sh.path}:{sh.sha256}": sh.id for sh in live}
            self._damaged.update({row_of[key]: why for key, why in damaged.items()})
            if damaged:
                quarantine(self.catalog, damaged)
            n_bad = len(quarantined) + len(damaged)
            warnings = []
            if n_bad:
                warnings.append(
                    f"{n_bad} damaged shard file(s) are quarantined and their slides left out of search; `indexer verify` lists them and `indexer build` re-embeds them"
                )
            if missing:
                warnings.append(
                    f"{missing} slide(s) are left out of search because their files are missing or changed; `indexer verify` lists them"
                )
            self.warnings = warnings
            LOG.info(
                "search index: %s, %d tiles in %d shards%s",
                kind,
                self.index.ntotal,
                len(files) - len(damaged),
                f" ({n_bad} quarantined)" if n_bad else "",
            )


def _swapped(index, folder: Path) -> bool:
    """Whether the compressed index in use is no longer the folder's current generation
    (engine.index.convert.swap_in moved the folder's pointer to a rebuilt one)."""
    from engine.index.compressed import resolve

    current = getattr(index, "folder", None)
    return index.kind == "compressed" and current is not None and Path(current) != resolve(folder)


def hidden_shards(session) -> set[int]:
    """Shards holding tiles of slides that are not indexed (missing files), or of an
    encoding that is not (any encoder's): they stay out of search. Few, and found by the
    (slide_id, ...) and encoding_id indexes, two selects rather than one OR across both
    tables (which would scan the tiles), so this stays cheap on millions of tiles."""
    by_slide = sa.select(Tile.shard_id).join(Slide, Slide.id == Tile.slide_id).where(Slide.status != INDEXED)
    by_encoding = (
        sa.select(Tile.shard_id)
        .join(SlideEncoding, SlideEncoding.id == Tile.encoding_id)
        .where(SlideEncoding.status != INDEXED)
    )
    return {i for i in session.scalars(sa.union(by_slide, by_encoding)) if i is not None}
