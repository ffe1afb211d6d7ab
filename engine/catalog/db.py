"""Opening the catalog: an engine, sessions, and bringing the schema to Alembic's head."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from engine.errors import CatalogError

LOG = logging.getLogger(__name__)


def migrations_dir() -> Path:
    """The Alembic script folder (the top-level `migrations` package)."""
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise CatalogError("the 'migrations' package is not installed; reinstall histoseek (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0])


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # '%' is interpolation syntax in ConfigParser; URLs may contain it (passwords).
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def make_engine(url: str) -> sa.Engine:
    """A SQLAlchemy engine; SQLite gets foreign keys, WAL and a busy timeout so several
    processes of one machine can share the file."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise CatalogError(f"bad catalog URL {url!r}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the catalog schema to `revision` with Alembic (creates an empty database)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


class Catalog:
    """The catalog database of one archive.

    `Catalog(url)` upgrades the schema to head first (a new SQLite file is created), so every
    command can open it without a separate set-up step.
    """

    def __init__(self, url: str, *, upgrade_schema: bool = True):
        self.url = url
        self.engine = make_engine(url)
        if upgrade_schema:
            try:
                upgrade(url)
            except sa.exc.OperationalError as exc:
                raise CatalogError(
                    f"cannot open the catalog at {make_url(url).render_as_string(hide_password=True)}: {exc.orig}"
                ) from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose work is committed on success and rolled back on error."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
