"""Alembic environment: runs migrations against the URL set by engine.catalog.db, or
`alembic -x url=...`, or HISTOSEEK_CATALOG."""

import os

from alembic import context

from engine.catalog import models  # noqa: F401  (registers the tables on Base.metadata)
from engine.catalog.base import Base
from engine.catalog.db import make_engine

config = context.config
target_metadata = Base.metadata


def catalog_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    url = url or config.get_main_option("sqlalchemy.url") or os.environ.get("HISTOSEEK_CATALOG")
    if not url:
        raise SystemExit("no catalog URL: pass -x url=... or set HISTOSEEK_CATALOG")
    return url


def run_migrations_offline() -> None:
    context.configure(url=catalog_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(catalog_url())
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch migrations rebuild SQLite tables (copy, drop, rename); with foreign keys on,
            # dropping the old `slides` would cascade-delete every tile. The pragma only takes
            # effect outside a transaction, so it is set and committed first; the engine is
            # disposed afterwards, so no later connection inherits it.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        # batch mode: SQLite cannot ALTER most things in place
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
