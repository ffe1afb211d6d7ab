"""Writing one finished slide: its shard file first, then one catalog transaction with the
shard row, the tile rows and the slide's status, so a slide is wholly indexed or not at all.

What a kill leaves, and how the next run repairs it:
- during the shard write: a `.NAME.PID.tmp.faiss` or `.tmp.json` file (engine.files.atomic_output,
  rename not reached) -> deleted;
- after the shard write, before the commit: a shard file that no row references -> deleted,
  the slide is still pending and is indexed again (to the same file name and tile ids);
- after the commit: nothing to repair.

Tile ids are `encoding id * TILE_ID_STRIDE + index in the slide's grid`, the encoding being
the slide's row for this encoder (SlideEncoding, made when the slide is registered for it),
so they do not depend on which rank, which run, or in which order slides were finished: a
resumed or distributed build gives the same ids as a clean single-process one, and two
encoders' tiles of one slide never share an id. (Catalogs from before several encoders had
encoding id = slide id, the ids their shards hold: migration 0004.)
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import FAILED, INDEXED, MISSING, PENDING, Shard, Slide, SlideEncoding, Tile
from engine.errors import CatalogError, ShardError
from engine.files import file_sha256
from engine.shards import SHARD_SUFFIX, ShardEncoder, encoder_dir, sidecar_of, write_shard
from engine.slides import SlideInfo
from engine.tiling import TileBox

LOG = logging.getLogger(__name__)

TILE_ID_STRIDE = 1 << 20  # tiles per slide at most (a 100k x 100k px slide at 0.25 um/px has ~12k)


def tile_ids(encoding_id: int, n: int) -> np.ndarray:
    """The ids of a slide's n tiles as one encoder embedded them (`encoding_id`: its
    SlideEncoding row; for catalogs from before migration 0004, the slide id)."""
    if n > TILE_ID_STRIDE:
        raise ValueError(f"a slide may have at most {TILE_ID_STRIDE} tiles, this one has {n}")
    return np.int64(encoding_id) * TILE_ID_STRIDE + np.arange(n, dtype=np.int64)


def encoding_of(session, slide_id: int, encoder_id: int, *, create: bool = True) -> SlideEncoding | None:
    """The slide's row for this encoder, made (pending) on first use when `create`."""
    row = session.scalar(
        sa.select(SlideEncoding).where(SlideEncoding.slide_id == slide_id, SlideEncoding.encoder_id == encoder_id)
    )
    if row is None and create:
        row = SlideEncoding(slide_id=slide_id, encoder_id=encoder_id, status=PENDING, tile_count=0)
        session.add(row)
        session.flush()
    return row


def settle_slide(session, slide: Slide) -> None:
    """The slide's own status from its encodings (engine.catalog.models): indexed by any
    encoder, else failed (with the first failure's reason), else pending. A missing file
    stays missing: that is the file's, and only registration settles it."""
    if slide.status == MISSING:
        return
    rows = session.execute(
        sa.select(SlideEncoding.status, SlideEncoding.error)
        .where(SlideEncoding.slide_id == slide.id)
        .order_by(SlideEncoding.encoder_id)
    ).all()
    if any(st == INDEXED for st, _ in rows):
        slide.status, slide.error = INDEXED, None
    elif failed := [err for st, err in rows if st == FAILED]:
        slide.status, slide.error = FAILED, failed[0]
    elif slide.status != FAILED:  # a file that cannot be read stays failed until it can
        slide.status, slide.error = PENDING, None


def shard_path_for(index_dir: Path, shard_encoder: ShardEncoder, slide_id: int) -> Path:
    return encoder_dir(index_dir, shard_encoder) / f"slide-{slide_id:09d}{SHARD_SUFFIX}"


def commit_slide(
    catalog: Catalog,
    index_dir: Path,
    shard_encoder: ShardEncoder,
    encoder_id: int,
    slide_id: int,
    info: SlideInfo,
    boxes: list[TileBox],
    vectors: np.ndarray,
    *,
    encoding_id: int | None = None,
) -> None:
    """Write the slide's shard of this encoder (`vectors`: unit-length rows from
    Encoder.embed_unit, one per box) and commit it; `encoding_id`: the slide's SlideEncoding
    row for the encoder (found or made here when not given). Other encoders' tiles of the
    slide are left as they are.

    The row is committed only while its file is there with the checksum just written
    (checked inside the transaction, right before the commit): a file deleted or replaced
    in between (by a repair that did not see this build, or by hand) is written again once,
    and the slide fails with a message if it goes again. When the commit fails (a full
    catalog, say), the file goes too: no shard is left that no row references."""
    if encoding_id is None:
        with catalog.session() as s:
            encoding_id = encoding_of(s, slide_id, encoder_id).id
    ids = tile_ids(encoding_id, len(boxes))
    path = shard_path_for(index_dir, shard_encoder, slide_id)
    rel = path.relative_to(index_dir).as_posix()
    _check_unit_rows(vectors)
    for attempt in (1, 2):
        sha = write_shard(path, ids, vectors, shard_encoder)
        try:
            with catalog.session() as s:
                slide = s.get(Slide, slide_id)
                if slide is None:
                    raise CatalogError(
                        f"slide {slide_id} vanished from the catalog while it was being indexed (removed by another command?)"
                    )
                encoding = s.get(SlideEncoding, encoding_id)
                if encoding is None:
                    raise CatalogError(
                        f"slide {slide_id}'s row for this encoder vanished while it was being indexed (removed by another command?)"
                    )
                s.execute(sa.delete(Tile).where(Tile.encoding_id == encoding_id))
                s.execute(sa.delete(Shard).where(Shard.path == rel))
                shard = Shard(encoder_id=encoder_id, path=rel, count=len(ids), sha256=sha)
                s.add(shard)
                s.flush()
                s.execute(
                    sa.insert(Tile),
                    [
                        {
                            "id": int(i),
                            "slide_id": slide_id,
                            "encoding_id": encoding_id,
                            "shard_id": shard.id,
                            "x": b.x,
                            "y": b.y,
                            "size": b.size,
                            "tissue_fraction": b.tissue_fraction,
                        }
                        for i, b in zip(ids, boxes)
                    ],
                )
                encoding.status, encoding.error = INDEXED, None
                encoding.tile_count = len(ids)
                encoding.indexed_at = dt.datetime.now(dt.timezone.utc)
                slide.status, slide.error = INDEXED, None
                _set_info(slide, info)
                s.flush()
                if not _file_is(path, sha):
                    raise _ShardGone(path)
            return
        except _ShardGone:
            if attempt == 2:
                _remove_shard_files(path)
                raise ShardError(
                    f"shard {rel} was deleted or replaced twice between its write and its commit; is another program cleaning {index_dir}? run the build again"
                ) from None
            LOG.warning("shard %s was deleted or replaced before its commit; writing it again", rel)
        except BaseException:
            _remove_shard_files(path)
            raise


def _check_unit_rows(vectors: np.ndarray) -> None:
    """The index stores what Encoder.embed_unit returns; it does not normalise again. Rows
    of another length are a caller's mistake (raw features passed in), not data to fix."""
    norm2 = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    bad = ~((np.abs(norm2 - 1.0) <= 1e-4) | (norm2 == 0.0))
    if bad.any():
        raise ValueError(
            f"commit_slide needs unit-length vectors (Encoder.embed_unit); row {int(np.flatnonzero(bad)[0])} has norm {float(np.sqrt(norm2[bad][0])):.3g}"
        )


class _ShardGone(Exception):
    pass


def _remove_shard_files(path: Path) -> None:
    path.unlink(missing_ok=True)
    sidecar_of(path).unlink(missing_ok=True)


def _file_is(path: Path, sha: str) -> bool:
    try:
        return file_sha256(path) == sha  # just written: read back from the page cache
    except OSError:
        return False


def _set_info(slide: Slide, info: SlideInfo | None) -> None:
    if info is None:
        return
    slide.mpp, slide.mpp_source = info.mpp, info.mpp_source
    slide.width, slide.height, slide.vendor = info.width, info.height, info.vendor


def fail_slide(
    catalog: Catalog, slide_id: int, error: str, info: SlideInfo | None = None, encoder_id: int | None = None
) -> None:
    """Record a slide that this encoder (`encoder_id`; None: the slide as a whole) cannot
    index, with the reason; the slide itself fails only when no encoder indexed it."""
    with catalog.session() as s:
        slide = s.get(Slide, slide_id)
        if slide is None:
            return
        _set_info(slide, info)
        if encoder_id is None:
            slide.status, slide.error = FAILED, error
            return
        encoding = encoding_of(s, slide_id, encoder_id)
        encoding.status, encoding.error, encoding.tile_count = FAILED, error, 0
        settle_slide(s, slide)
