"""histoseek web app: pages for pathologists, a JSON API and deep-zoom slide tiles.

`create_app(test_config=None)` follows the Flask tutorial's order: defaults, then the
instance file `histoseek.cfg`, then `HISTOSEEK_*` environment variables, then the test
override. Nothing is configured at import time; gunicorn serves `webapp:create_app()`.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

from engine.config import Settings, default_data_dir
from engine.catalog.models import MAX_ROW_ID

DEFAULTS = {
    # Uploads larger than this are refused with 413 before they are read.
    "MAX_CONTENT_LENGTH": 20 * 1024 * 1024,
    # Uploaded regions decoding to more pixels than this are refused (decompression bombs).
    "MAX_UPLOAD_PIXELS": 40_000_000,
    # Smallest accepted region edge, in pixels, and least tissue in it.
    "MIN_REGION_PX": 32,
    "MIN_TISSUE_FRACTION": 0.05,
    # Failed logins of one user name from one address within 5 minutes before further tries
    # from that address get 429, and of any user names from one address.
    "LOGIN_MAX_FAILURES": 10,
    "LOGIN_MAX_FAILURES_PER_ADDRESS": 50,
    # Reverse proxies in front of the app whose X-Forwarded-For/-Proto are trusted (0: none;
    # 1 behind one nginx). Login throttling counts by the client address this yields.
    "TRUSTED_PROXIES": 0,
    # Seconds a request body may take to arrive under gunicorn (slow-body clients otherwise
    # hold a worker thread for as long as they trickle; webapp.server.BodyDeadline).
    "REQUEST_BODY_TIMEOUT": 30,
    # Deepest nesting accepted in a JSON request body (a 5,000-deep body crashed the parser).
    "MAX_JSON_DEPTH": 32,
    "DEFAULT_TOP_K": 10,
    "MAX_TOP_K": 100,
    "SLIDES_PER_PAGE": 50,
    # Open slides kept per worker for deep-zoom tiles.
    "SLIDE_CACHE_SIZE": 16,
    # Encoded deep-zoom tiles kept per worker (0 = none).
    "TILE_CACHE_MB": 64,
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    "PERMANENT_SESSION_LIFETIME": dt.timedelta(hours=8),
}


def instance_dir(test_config: dict | None) -> Path:
    """The instance folder (config file, secret key): HISTOSEEK_INSTANCE_DIR, else
    `<data dir>/webapp`, so an installed package never writes beside its own code."""
    if test_config and test_config.get("INSTANCE_PATH"):
        return Path(test_config["INSTANCE_PATH"]).resolve()
    env = os.environ
    if env.get("HISTOSEEK_INSTANCE_DIR"):
        return Path(env["HISTOSEEK_INSTANCE_DIR"]).expanduser().resolve()
    data_dir = Path(env.get("HISTOSEEK_DATA_DIR") or default_data_dir(env)).expanduser()
    return (data_dir / "webapp").resolve()


def persistent_secret_key(folder: Path) -> str:
    """The session signing key kept in the instance folder. Every gunicorn worker must sign
    with the same key, so the first one to start creates it atomically (link, not write)
    and the others read it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "secret_key"
    if not path.exists():
        tmp = folder / f".secret_key.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()




class CatalogIdConverter(IntegerConverter):
    """`<int:...>` in every route of this app: a non-negative integer that fits the
    database's integer ids. A larger number in a URL (2**31, 2**63, 10**30) is no such slide,
    run or tile: 404, instead of an overflow in the database driver (500)."""

    def __init__(self, map, fixed_digits=0, min=None, max=None, signed=False):
        super().__init__(map, fixed_digits, min, MAX_ROW_ID if max is None else max, signed)

    def to_python(self, value: str):
        if len(value.lstrip("-")) > 19:  # > 19 digits cannot fit; skip converting 5,000 digits
            from werkzeug.routing import ValidationError

            raise ValidationError()
        return super().to_python(value)


def build_settings(config) -> Settings:
    """Engine settings from the app config (instance file / environment / test override)."""
    if config.get("SETTINGS") is not None:
        return config["SETTINGS"]
    return Settings.load(
        data_dir=config.get("DATA_DIR"),
        catalog_url=config.get("CATALOG"),
        index_dir=config.get("INDEX_DIR"),
        encoder=config.get("ENCODER"),
        device=config.get("DEVICE"),
        precision=config.get("PRECISION"),
    )


def create_app(test_config: dict | None = None) -> Flask:
    folder = instance_dir(test_config)
    app = Flask(__name__, instance_path=str(folder), instance_relative_config=True)
    app.config.from_mapping(DEFAULTS)
    app.config.from_pyfile("histoseek.cfg", silent=True)
    app.config.from_prefixed_env("HISTOSEEK")
    if test_config:
        app.config.from_mapping(test_config)
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = persistent_secret_key(folder)

    from webapp import api, auth, csrf, errors, pages, tiles
    from webapp.state import AppState

    # before any blueprint adds its rules: rules bind their converters when added
    app.url_map.converters["int"] = CatalogIdConverter
    app.json = api.BoundedJSONProvider(app)
    if int(app.config["TRUSTED_PROXIES"]) > 0:
        hops = int(app.config["TRUSTED_PROXIES"])
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    app.extensions["histoseek"] = AppState(app.config, build_settings(app.config))
    csrf.init_app(app)
    auth.init_app(app)
    errors.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(tiles.bp)
    return app
