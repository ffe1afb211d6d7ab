"""Running the app under gunicorn from Python (the `serve` command and the demo)."""

from __future__ import annotations

import logging
import threading

from gunicorn.app.base import BaseApplication

from engine.config import Settings
from engine.errors import HistoseekError

LOG = logging.getLogger(__name__)


class HistoseekServer(BaseApplication):
    """gunicorn with the app built inside each worker (no preload: every worker opens its
    own database connections and slides after the fork)."""

    def __init__(self, settings: Settings, options: dict, app_config: dict | None = None):
        self.settings = settings
        self.options = options
        self.app_config = app_config or {}
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from webapp import create_app

        app = create_app({"SETTINGS": self.settings, **self.app_config})
        threading.Thread(target=warm_search_engine, args=(app,), name="warm-search", daemon=True).start()
        return app


def warm_search_engine(app) -> None:
    """Load the encoder and the index while the worker already serves pages, so the first
    search does not wait seconds for them."""
    try:
        app.extensions["histoseek"].search_engine()
    except HistoseekError as exc:  # e.g. nothing indexed yet: searches will say so
        LOG.info("search engine not loaded at start: %s", exc)


def gunicorn_options(host: str, port: int, workers: int, threads: int, timeout: int, access_log: bool) -> dict:
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread",
        "timeout": timeout,
        "graceful_timeout": 10,
        # Slow region searches must not block the upload of the next one.
        "keepalive": 5,
        "errorlog": "-",
        "loglevel": "info",
    }
    if access_log:
        options["accesslog"] = "-"
    return options


def run_gunicorn(settings: Settings, *, host="127.0.0.1", port=8000, workers=2, threads=8, timeout=120, access_log=False, app_config=None) -> None:
    HistoseekServer(settings, gunicorn_options(host, port, workers, threads, timeout, access_log), app_config).run()
