"""Per-process state of the app: the catalog, the search engines (one per encoder of the
archive searched with, each loaded on first use, since loading an encoder takes seconds) and
the cache of open slides for deep-zoom tiles."""

from __future__ import annotations

import threading

import sqlalchemy as sa
from flask import current_app

from engine.catalog import Catalog, models
from engine.config import Settings
from engine.encoder import is_random_spec
from webapp.slide_cache import SlideCache


class AppState:
    def __init__(self, config, settings: Settings):
        self.settings = settings
        self.catalog = Catalog(settings.catalog_url)
        self.slides = SlideCache(
            self.catalog,
            capacity=int(config["SLIDE_CACHE_SIZE"]),
            tile_cache_bytes=int(config["TILE_CACHE_MB"]) * 1024 * 1024,
        )
        self._engines: dict[str | None, object] = {}  # encoder name (None: the default) -> SearchEngine
        self._stamps: dict[str | None, tuple] = {}
        self._engine_lock = threading.Lock()

    def index_stamp(self) -> tuple:
        """Changes whenever `indexer build` adds, grows or replaces a shard."""
        with self.catalog.session() as s:
            return tuple(
                s.execute(
                    sa.select(
                        sa.func.count(models.Shard.id),
                        sa.func.sum(models.Shard.count),
                        sa.func.max(models.Shard.updated_at),
                    )
                ).one()
            )

    def search_engine(self, encoder: str | None = None):
        """The SearchEngine of this worker for `encoder` (a name of `encoder_choices`; None:
        the configured one, else the archive's only one): built once (under a lock, so
        concurrent first requests do not load the encoder twice), and refreshed when the
        index has changed since, so a running server sees newly indexed slides."""
        stamp = self.index_stamp()
        engine = self._engines.get(encoder)
        if engine is None or stamp != self._stamps.get(encoder):
            with self._engine_lock:
                engine = self._engines.get(encoder)
                if engine is None:
                    from engine.search import SearchEngine

                    engine = SearchEngine(self.settings, catalog=self.catalog, encoder_name=encoder)
                    # the encoder's fast path is prepared here, once and under this lock,
                    # before any request can embed with it; the engine is published after
                    engine.encoder.warm_up()
                    self._engines[encoder] = engine
                elif stamp != self._stamps.get(encoder):
                    engine.refresh()
                self._stamps[encoder] = stamp
        return engine

    def encoder_choices(self) -> list[dict]:
        """The archive's searchable encoders (engine.search.which_encoder.encoder_choices)."""
        from engine.search.which_encoder import encoder_choices

        return encoder_choices(self.catalog)

    def default_encoder(self, choices: list[dict] | None = None) -> str | None:
        """The name of the encoder a search that names none uses: the configured one (when
        the archive holds it), else the only one; None when there is no default."""
        from engine.errors import HistoseekError
        from engine.search.which_encoder import search_encoder

        choices = self.encoder_choices() if choices is None else choices
        if self.settings.encoder:
            try:
                _, row = search_encoder(self.catalog, self.settings.encoder, verify=False)
            except (HistoseekError, sa.exc.SQLAlchemyError):
                return None
            return row["name"] if row else None
        return choices[0]["name"] if len(choices) == 1 else None

    @property
    def engine_loaded(self) -> bool:
        return bool(self._engines)

    @property
    def _engine(self):
        """The default encoder's engine once loaded, else any loaded one (None: none yet)."""
        return self._engines.get(None) or next(iter(self._engines.values()), None)

    @property
    def encoder_is_random(self) -> bool:
        """True when an encoder searches may use has random weights (demo, not for diagnosis):
        the loaded one, else the configured one, else any of the archive's."""
        if self._engine is not None:
            return bool(self._engine.encoder.info.is_random)
        if self.settings.encoder:
            return is_random_spec(self.settings.encoder)
        try:
            return any(c["is_random"] for c in self.encoder_choices())
        except sa.exc.SQLAlchemyError:
            return False


def state() -> AppState:
    return current_app.extensions["histoseek"]
