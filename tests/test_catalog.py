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
    assert {"slides", "tiles", "shards", "encoders", "benchmark_runs", "users", "audit_events", "alembic_version"} <= tables
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
        enc = models.Encoder(name="random", architecture="resnet18", checkpoint_sha256="a" * 64, dim=512, target_mpp=1.0, tile_px=224, normalisation={"mean": [0.5]}, is_random=True)
        slide = models.Slide(path="a/b.svs", fingerprint="f" * 64, patient="P1", extra={"stain": "H&E", "n": 3}, mpp=0.5, encoder=enc)
        slide.tiles = [models.Tile(id=2**40 + i, x=i * 448, y=0, size=448, tissue_fraction=0.9) for i in range(3)]
        s.add(slide)
    with cat.session() as s:
        slide = s.scalars(sa.select(models.Slide)).one()
        assert slide.extra == {"stain": "H&E", "n": 3}
        assert slide.status == models.PENDING
        assert sorted(t.id for t in slide.tiles) == [2**40, 2**40 + 1, 2**40 + 2]
        s.delete(slide)
    with cat.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(models.Tile)) == 0
    cat.dispose()


def test_fingerprint_is_unique(catalog_url):
    cat = Catalog(catalog_url)
    with pytest.raises(sa.exc.IntegrityError):
        with cat.session() as s:
            s.add_all([models.Slide(path="a.svs", fingerprint="x"), models.Slide(path="b.svs", fingerprint="x")])
    cat.dispose()
