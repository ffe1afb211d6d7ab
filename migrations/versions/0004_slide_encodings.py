"""slide_encodings: a slide's status per encoder, so one catalog holds several encoders

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 16:00:00

What moves where: `slides.encoder_id`, `tile_count` and `indexed_at` become one
`slide_encodings` row per slide that had an encoder, with id = the slide id, so the tiles'
ids (slide id * 2^20 + index, the FAISS ids in the shards already written) are the ids that
row gives (indexer/writer.py) and nothing is embedded again. The per-encoder status is the
slide's old one, except `missing`: a file gone is about the file, not the encoder, so it
stays on the slide (`slides.status`), and the encoding keeps `indexed` when its vectors were
kept (tile_count > 0). `slides.status` and `slides.error` stay: the slide as a whole.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _sqlite_seq(bind, table: str) -> int:
    row = bind.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).first()
    return int(row[0]) if row else 0


def _set_sqlite_seq(bind, table: str, value: int) -> None:
    if bind.exec_driver_sql("SELECT 1 FROM sqlite_sequence WHERE name = ?", (table,)).first():
        bind.exec_driver_sql("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (value, table))
    else:
        bind.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, value))


def upgrade() -> None:
    bind = op.get_bind()
    is_sqlite = bind.dialect.name == "sqlite"
    op.create_table(
        "slide_encodings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("encoder_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("tile_count", sa.Integer(), nullable=False),
        sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["encoder_id"], ["encoders.id"], name=op.f("fk_slide_encodings_encoder_id_encoders")),
        sa.ForeignKeyConstraint(
            ["slide_id"], ["slides.id"], name=op.f("fk_slide_encodings_slide_id_slides"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_slide_encodings")),
        sa.UniqueConstraint("slide_id", "encoder_id", name="uq_slide_encodings_slide_encoder"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("slide_encodings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_slide_encodings_encoder_id"), ["encoder_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_slide_encodings_slide_id"), ["slide_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_slide_encodings_status"), ["status"], unique=False)
    # id = slide id: the tile ids already in the shards stay the ones this row gives
    op.execute(
        "INSERT INTO slide_encodings (id, slide_id, encoder_id, status, error, tile_count, indexed_at, created_at, updated_at) "
        "SELECT id, id, encoder_id, "
        "CASE WHEN status = 'missing' THEN (CASE WHEN tile_count > 0 THEN 'indexed' ELSE 'pending' END) ELSE status END, "
        "CASE WHEN status = 'failed' THEN error ELSE NULL END, "
        "tile_count, indexed_at, created_at, updated_at FROM slides WHERE encoder_id IS NOT NULL"
    )
    slides_seq = _sqlite_seq(bind, "slides") if is_sqlite else None

    with op.batch_alter_table("tiles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("encoding_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_tiles_encoding_id"), ["encoding_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_tiles_encoding_id_slide_encodings"),
            "slide_encodings",
            ["encoding_id"],
            ["id"],
            ondelete="CASCADE",
        )
    op.execute("UPDATE tiles SET encoding_id = slide_id WHERE slide_id IN (SELECT id FROM slide_encodings)")

    # SQLite rebuilds `slides` to drop columns (foreign keys are off while migrating,
    # migrations/env.py, so tiles are not cascade-deleted); AUTOINCREMENT is declared again
    # and its sequence restored below, so an id removed before the upgrade is not handed out.
    with op.batch_alter_table(
        "slides", schema=None, table_kwargs={"sqlite_autoincrement": True} if is_sqlite else {}
    ) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_slides_encoder_id_encoders"), type_="foreignkey")
        batch_op.drop_column("encoder_id")
        batch_op.drop_column("tile_count")
        batch_op.drop_column("indexed_at")

    # new encodings take ids above every slide id ever given: a tile id never names two
    # tiles, even of a slide removed before the upgrade
    if is_sqlite:
        _set_sqlite_seq(bind, "slides", slides_seq)
        top = bind.exec_driver_sql("SELECT coalesce(max(id), 0) FROM slide_encodings").scalar()
        _set_sqlite_seq(bind, "slide_encodings", max(slides_seq, int(top)))
    elif bind.dialect.name == "postgresql":
        op.execute(
            "SELECT setval(pg_get_serial_sequence('slide_encodings', 'id'), "
            "greatest((SELECT coalesce(max(id), 0) FROM slide_encodings), "
            "coalesce(pg_sequence_last_value(pg_get_serial_sequence('slides', 'id')::regclass), 0), 1))"
        )


def downgrade() -> None:
    # one encoder per slide again: the first indexed encoding (lowest encoder id) of each
    with op.batch_alter_table("slides", schema=None) as batch_op:
        batch_op.add_column(sa.Column("encoder_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("tile_count", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_foreign_key(batch_op.f("fk_slides_encoder_id_encoders"), "encoders", ["encoder_id"], ["id"])
    first = (
        "(SELECT e.{col} FROM slide_encodings e WHERE e.slide_id = slides.id AND e.status = 'indexed' "
        "ORDER BY e.encoder_id LIMIT 1)"
    )
    op.execute(
        f"UPDATE slides SET encoder_id = {first.format(col='encoder_id')}, "
        f"tile_count = coalesce({first.format(col='tile_count')}, 0), indexed_at = {first.format(col='indexed_at')}"
    )
    with op.batch_alter_table("tiles", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_tiles_encoding_id_slide_encodings"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_tiles_encoding_id"))
        batch_op.drop_column("encoding_id")
    op.drop_table("slide_encodings")
