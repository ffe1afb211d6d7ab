"""The catalog schema comes from Alembic on SQLite and PostgreSQL, and agrees with the models."""

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.util.exc import CommandError

from engine.catalog import Catalog, models
from engine.catalog.db import alembic_config


def test_upgrade_head_creates_every_table(catalog_url):
    cat = Catalog(catalog_url)
    tables = set(sa.inspect(cat.engine).get_table_names())
    assert {
        "slides",
        "tiles",
        "shards",
        "encoders",
        "benchmark_runs",
        "users",
        "audit_events",
        "alembic_version",
    } <= tables
    cat.dispose()


def test_models_and_migrations_agree(catalog_url):
    """`alembic check`: fails when a model changed without a migration."""
    cat = Catalog(catalog_url)
    command.check(alembic_config(catalog_url))
    cat.dispose()


def test_check_notices_a_model_without_migration(sqlite_url):
    cat = Catalog(sqlite_url)
    extra = sa.Table("not_migrated", models.Base.metadata, sa.Column("id", sa.Integer, primary_key=True))
    try:
        with pytest.raises(CommandError, match="New upgrade operations detected"):
            command.check(alembic_config(sqlite_url))
    finally:
        models.Base.metadata.remove(extra)
        cat.dispose()


def test_slide_tiles_round_trip_and_cascade(catalog_url):
    cat = Catalog(catalog_url)
    with cat.session() as s:
        enc = models.EncoderRecord(
            name="random",
            architecture="resnet18",
            checkpoint_sha256="a" * 64,
            dim=512,
            target_mpp=1.0,
            tile_px=224,
            normalisation={"mean": [0.5]},
            is_random=True,
        )
        slide = models.Slide(
            path="a/b.svs", fingerprint="f" * 64, patient="P1", extra={"stain": "H&E", "n": 3}, mpp=0.5
        )
        encoding = models.SlideEncoding(slide=slide, encoder=enc, status=models.INDEXED, tile_count=3)
        slide.tiles = [
            models.Tile(id=2**40 + i, encoding=encoding, x=i * 448, y=0, size=448, tissue_fraction=0.9)
            for i in range(3)
        ]
        s.add(slide)
    with cat.session() as s:
        slide = s.scalars(sa.select(models.Slide)).one()
        assert slide.extra == {"stain": "H&E", "n": 3}
        assert slide.status == models.PENDING
        assert sorted(t.id for t in slide.tiles) == [2**40, 2**40 + 1, 2**40 + 2]
        # the one-encoder view of the slide (MIL, pretraining) reads its encoding
        assert (slide.tile_count, slide.encoder_id) == (3, s.scalar(sa.select(models.EncoderRecord.id)))
        s.delete(slide)
    with cat.session() as s:
        for table in (models.Tile, models.SlideEncoding):
            assert s.scalar(sa.select(sa.func.count()).select_from(table)) == 0
    cat.dispose()


def test_fingerprint_is_unique(catalog_url):
    cat = Catalog(catalog_url)
    with pytest.raises(sa.exc.IntegrityError):
        with cat.session() as s:
            s.add_all([models.Slide(path="a.svs", fingerprint="x"), models.Slide(path="b.svs", fingerprint="x")])
    cat.dispose()


@pytest.mark.parametrize("table", [models.Slide, models.Shard])
def test_ids_are_never_reused_after_the_highest_row_is_removed(catalog_url, table):
    """Issue 11.3: SQLite handed a removed slide's id to the next new slide, and the web
    worker's caches (keyed by id) then showed the removed slide's pixels under the new one's
    name. AUTOINCREMENT (a sequence on PostgreSQL) makes every id new."""
    cat = Catalog(catalog_url)

    def add(n: int) -> int:
        with cat.session() as s:
            if table is models.Slide:
                row = models.Slide(path=f"s{n}.svs", fingerprint=f"{n:064d}")
            else:
                enc = s.scalar(sa.select(models.EncoderRecord)) or models.EncoderRecord(
                    name="r",
                    architecture="resnet18",
                    checkpoint_sha256="a" * 64,
                    dim=4,
                    target_mpp=1.0,
                    tile_px=224,
                    normalisation={},
                )
                row = models.Shard(encoder=enc, path=f"s{n}.faiss", sha256="0" * 64)
            s.add(row)
            s.flush()
            return row.id

    first, highest = add(1), add(2)
    with cat.session() as s:
        s.delete(s.get(table, highest))
    assert add(3) > highest > first
    cat.dispose()


def test_upgrade_from_0001_keeps_tiles_and_stops_id_reuse(sqlite_url):
    """The 0002 rebuild of `slides` on SQLite must not cascade-delete tiles (foreign keys are
    turned off while migrating) and must seed the sequence from the highest existing id."""
    command.upgrade(alembic_config(sqlite_url), "0001")
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO encoders VALUES (1,'r','resnet18','" + "a" * 64 + "',4,1.0,224,'{}',0,'2026-01-01')"
        )
        for sid in (1, 7):
            conn.exec_driver_sql(
                f"INSERT INTO slides (id,path,fingerprint,extra,status,tile_count,created_at,updated_at) VALUES ({sid},'s{sid}','{sid:064d}','{{}}','indexed',1,'2026-01-01','2026-01-01')"
            )
            conn.exec_driver_sql(
                f"INSERT INTO tiles (id,slide_id,x,y,size,tissue_fraction) VALUES ({sid * 2**20},{sid},0,0,448,1.0)"
            )
    engine.dispose()
    cat = Catalog(sqlite_url)  # upgrades to head
    with cat.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(models.Tile)) == 2
        s.delete(s.get(models.Slide, 7))
    with cat.session() as s:
        new = models.Slide(path="n.svs", fingerprint="n" * 64)
        s.add(new)
        s.flush()
        assert new.id == 8
    cat.dispose()
