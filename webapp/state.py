"""Per-process state of the app: the catalog, the search engine (loaded on first use, since
loading the encoder takes seconds) and the cache of open slides for deep-zoom tiles."""

from __future__ import annotations

import threading

from flask import current_app

from engine.catalog import Catalog
from engine.config import Settings
from webapp.slide_cache import SlideCache


class AppState:
    def __init__(self, config, settings: Settings):
        self.settings = settings
        self.catalog = Catalog(settings.catalog_url)
        self.slides = SlideCache(self.catalog, capacity=int(config["SLIDE_CACHE_SIZE"]))
        self._engine = None
        self._engine_lock = threading.Lock()
        self._engine_factory = config.get("SEARCH_ENGINE_FACTORY")

    def search_engine(self):
        """The SearchEngine of this worker, built once (double-checked under a lock so
        concurrent first requests do not load the encoder twice)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    from engine.search import SearchEngine

                    factory = self._engine_factory or SearchEngine
                    self._engine = factory(self.settings, catalog=self.catalog)
        return self._engine

    @property
    def encoder_is_random(self) -> bool:
        """True when the configured encoder has random weights (demo, not for diagnosis)."""
        spec = self.settings.encoder or ""
        return spec == "random" or spec.startswith("random:")


def state() -> AppState:
    return current_app.extensions["histoseek"]
