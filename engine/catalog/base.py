"""The one declarative base, with a naming convention so Alembic names constraints the
same way on SQLite and PostgreSQL (and batch migrations on SQLite can find them)."""

import datetime as dt

from sqlalchemy import JSON, BigInteger, DateTime, MetaData
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT ids (SQLite's INTEGER is 64-bit already, and only an INTEGER PRIMARY KEY
# auto-increments there). Not for the number of tiles: a tile's id is slide id x 2^20 + its
# index in the slide (indexer/writer.py, TILE_ID_STRIDE), so tile ids pass int32's 2^31 from
# slide id 2048 on, whatever the tile count; they are also the FAISS int64 ids.
BigId = BigInteger().with_variant(sqlite.INTEGER(), "sqlite")
# JSONB on PostgreSQL, JSON text on SQLite.
JsonDoc = JSON().with_variant(postgresql.JSONB(), "postgresql")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: DateTime(timezone=True)}
