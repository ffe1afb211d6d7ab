"""The catalog reads a search makes once the index has answered: the neighbour tiles'
slides and boxes, then the result slides' descriptions (with, for a region query, every
tile of those slides, on which the region is placed). Each is ONE SQL statement however
many ids it asks about (tests/test_search_roundtrips.py counts them): the ids travel as one
parameter, a JSON array on SQLite, an array on PostgreSQL, rather than in chunks of
bound parameters, one round trip each.

With several encoders over one archive a slide has tiles of each; a search reads only those
of the encoder it searches with (`tile_of_encoder`: the tile's shard is that encoder's), which
every caller names.
Also here: which indexed slide a slide query names, and its mosaic, of that encoder's tiles."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from engine.catalog.db import Catalog
from engine.catalog.models import INDEXED, Slide, SlideEncoding, Tile, tile_of_encoder
from engine.errors import NotFound, QueryError


def ids_in(column, ids, dialect: str):
    """`column IN ids` as one bound parameter (a search may ask about 50,000 tile ids: more
    than SQLite's bound-parameter limit, and one IN clause per chunk is one round trip each)."""
    ids = [int(i) for i in ids]
    if dialect == "postgresql":
        return column == sa.any_(sa.bindparam(None, ids, type_=postgresql.ARRAY(sa.BigInteger)))
    if dialect == "sqlite":
        return column.in_(sa.select(sa.func.json_each(json.dumps(ids)).table_valued("value").c.value))
    return column.in_(ids)


def tile_rows(catalog: Catalog, ids: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """tile id -> (slide id, x, y, size) of those tiles still in the catalog."""
    if not len(ids):
        return {}
    q = sa.select(Tile.id, Tile.slide_id, Tile.x, Tile.y, Tile.size).where(
        ids_in(Tile.id, ids, catalog.engine.dialect.name)
    )
    with catalog.session() as s:
        return {int(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in s.execute(q)}


@dataclasses.dataclass
class SlideRow:
    """A result slide: what a hit shows of it, its um/px (None: unknown) for the pixel
    placement, and (when asked for) all its tiles: ids and level-0 boxes (x, y, size)."""

    info: dict  # id, path, patient, site, diagnosis, label
    mpp: float | None
    tile_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    boxes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int64))


def result_slides(
    catalog: Catalog,
    slide_ids: list[int],
    *,
    with_tiles: bool,
    tiles_of: list[int] | None = None,
    encoder_id: int,
) -> dict[int, SlideRow]:
    """The slides still in the catalog among `slide_ids`, by id; `with_tiles`: with all
    their tiles of `encoder_id`, joined in the same statement (a few top slides' tiles, a few thousand rows each,
    so the slide columns repeated on every row cost less than a second trip); `tiles_of`:
    only those slides' tiles (the others are described without)."""
    if not slide_ids:
        return {}
    cols = [Slide.id, Slide.path, Slide.patient, Slide.site, Slide.diagnosis, Slide.label, Slide.mpp]
    q = sa.select(*cols).where(Slide.id.in_([int(i) for i in slide_ids]))
    if with_tiles:
        on = Tile.slide_id == Slide.id
        if tiles_of is not None:
            on = sa.and_(on, Tile.slide_id.in_([int(i) for i in tiles_of] or [-1]))
        on = sa.and_(on, tile_of_encoder(encoder_id))
        q = q.add_columns(Tile.id, Tile.x, Tile.y, Tile.size).outerjoin(Tile, on).order_by(Slide.id, Tile.id)
    out: dict[int, SlideRow] = {}
    tiles: dict[int, list] = {}
    with catalog.session() as s:
        for r in s.execute(q):
            sid = int(r[0])
            if sid not in out:
                out[sid] = SlideRow(
                    {"id": sid, "path": r[1], "patient": r[2], "site": r[3], "diagnosis": r[4], "label": r[5]},
                    float(r[6]) if r[6] else None,
                )
                tiles[sid] = []
            if with_tiles and r[7] is not None:
                tiles[sid].append(r[7:])
    for sid, rows in tiles.items():
        if rows:
            arr = np.array(rows, np.int64)
            out[sid].tile_ids, out[sid].boxes = arr[:, 0], arr[:, 1:]
    return out


def resolve_slide(catalog: Catalog, slide: int | str | Path, encoder_id: int) -> tuple[int | None, Path | None]:
    """(catalog id, None) for a slide indexed with the encoder (its id, or its file), (None,
    path) for a file not in the archive; a QueryError for a slide of the archive that is not
    indexed with this encoder (missing, failed, pending, or only indexed with another)."""
    from engine.slides import fingerprint

    with catalog.session() as s:
        if isinstance(slide, (int, np.integer)) or (isinstance(slide, str) and slide.isdigit()):
            sid = int(slide)
        else:
            path = Path(slide)
            if not path.is_file():
                raise NotFound(f"{path}: no such slide file (give a slide file or the id of an indexed slide)")
            sid = s.scalar(sa.select(Slide.id).where(Slide.fingerprint == fingerprint(path)))
            if sid is None:
                return None, path
        row = s.get(Slide, sid)
        if row is None:
            raise NotFound(f"no slide with id {sid} in the catalog (`indexer status` lists them)")
        encoded = s.scalar(
            sa.select(SlideEncoding.status).where(SlideEncoding.slide_id == sid, SlideEncoding.encoder_id == encoder_id)
        )
        has_tiles = s.scalar(sa.select(sa.exists().where(Tile.slide_id == sid, tile_of_encoder(encoder_id))))
        if row.status != INDEXED or not (encoded == INDEXED or (encoded is None and has_tiles)):
            status = row.status if row.status != INDEXED else f"{encoded or 'not indexed'} with this encoder"
            raise QueryError(
                f"slide {sid} ({Path(row.path).name}) is not indexed with this encoder (status {status}); "
                "index it (`indexer build` with this encoder), search with its file, or choose another encoder"
            )
    return sid, None


def slide_tiles(catalog: Catalog, slide_id: int, encoder_id: int) -> list[tuple[int, int, int, int]]:
    """(tile id, x, y, size) of the slide's tiles of this encoder, in id order."""
    with catalog.session() as s:
        return [
            tuple(r)
            for r in s.execute(
                sa.select(Tile.id, Tile.x, Tile.y, Tile.size)
                .where(Tile.slide_id == slide_id, tile_of_encoder(encoder_id))
                .order_by(Tile.id)
            )
        ]
