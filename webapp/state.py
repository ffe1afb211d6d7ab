"""Per-process state of the app: the catalog, the search engine (loaded on first use, since
loading the encoder takes seconds) and the cache of open slides for deep-zoom tiles."""

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
        self._engine = None
        self._engine_lock = threading.Lock()
        self._index_stamp = None

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

    def search_engine(self):
        """The SearchEngine of this worker: built once (under a lock, so concurrent first
        requests do not load the encoder twice), and refreshed when the index has changed
        since, so a running server sees newly indexed slides."""
        stamp = self.index_stamp()
        if self._engine is None or stamp != self._index_stamp:
            with self._engine_lock:
                if self._engine is None:
                    from engine.search import SearchEngine

                    engine = SearchEngine(self.settings, catalog=self.catalog)
                    # the encoder's fast path is prepared here, once and under this lock,
                    # before any request can embed with it; the engine is published after
                    engine.encoder.warm_up()
                    self._engine = engine
                elif stamp != self._index_stamp:
                    self._engine.refresh()
                self._index_stamp = stamp
        return self._engine

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None

    @property
    def encoder_is_random(self) -> bool:
        """True when the encoder searches use has random weights (demo, not for diagnosis): the
        configured one, else the index's own (engine.search.which_encoder, as SearchEngine loads it)."""
        if self._engine is not None:
            return bool(self._engine.encoder.info.is_random)
        spec = self.settings.encoder
        if spec is None:
            from engine.errors import HistoseekError
            from engine.search.which_encoder import index_encoder_spec

            try:
                spec = index_encoder_spec(self.catalog, verify=False)
            except (HistoseekError, sa.exc.SQLAlchemyError):
                return False
        return is_random_spec(spec)


def state() -> AppState:
    return current_app.extensions["histoseek"]
