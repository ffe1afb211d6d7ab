"""histoseek web app: pages for pathologists, a JSON API and deep-zoom slide tiles.

`create_app(test_config=None)` is configured by `load_config`, the one reader of the web
app's settings (defaults, then the instance file `histoseek.cfg`, then `HISTOSEEK_*`
environment variables, then the test override) for `histoseek-web serve` and for gunicorn
alike. Nothing is configured at import time; gunicorn serves `webapp:create_app()`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from pathlib import Path
from typing import Mapping

from flask import Config, Flask
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

from engine.catalog.models import MAX_ROW_ID
from engine.config import ENV_PREFIX, Settings
from engine.errors import ConfigError

# The web app's settings file, in the instance folder.
CONFIG_FILE = "histoseek.cfg"
# Settings of engine.config.Settings (HISTOSEEK_<NAME>), refused in histoseek.cfg: the web
# app reads them as every command does, so `serve` and gunicorn cannot disagree on them.
ENGINE_SETTINGS = frozenset(
    {"DATA_DIR", "CATALOG", "INDEX_DIR", "ENCODER", "DEVICE", "PRECISION", "TARGET_MPP", "TILE_PX", "INSTANCE_DIR"}
)

DEFAULTS = {
    # Uploads larger than this are refused with 413 before they are read.
    "MAX_CONTENT_LENGTH": 20 * 1024 * 1024,
    # Uploaded regions decoding to more pixels than this are refused (decompression bombs).
    "MAX_UPLOAD_PIXELS": 40_000_000,
    # Smallest accepted region edge, in pixels (how much tissue is the engine's rule).
    "MIN_REGION_PX": 32,
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
    # Folder of example regions the search page offers with one click (webapp.examples;
    # empty: none). `make demo` writes a few.
    "EXAMPLES_DIR": "",
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    "PERMANENT_SESSION_LIFETIME": dt.timedelta(hours=8),
}


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


def _parse_env(raw: str):
    """An environment value as JSON where it is JSON (`true`, `30`, `0.5`), else the
    text itself, as Flask's `from_prefixed_env` reads it."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _checked(name: str, value, source: str):
    """`value` of web-app setting `name`, in the type of its default: a ConfigError naming
    where it came from when it is not one (a typo fails at start, not on some request)."""
    default = DEFAULTS.get(name, Flask.default_config.get(name))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, what = isinstance(value, bool), "true or false"
    elif isinstance(default, dt.timedelta):
        value = dt.timedelta(seconds=value) if number else value
        ok, what = isinstance(value, dt.timedelta), "a number of seconds"
    elif isinstance(default, float):
        ok, what = number, "a number"
    elif isinstance(default, int):
        ok, what = number and float(value).is_integer(), "a whole number"
        value = int(value) if ok else value
    else:
        ok, what = True, ""
    if not ok:
        raise ConfigError(f"{name} from {source} must be {what}, not {value!r}")
    return value


def load_config(overrides: dict | None = None, env: Mapping[str, str] | None = None) -> dict:
    """The web app's whole configuration, read in this one place by `histoseek-web serve`
    (before gunicorn starts, and again in each worker) and by `gunicorn 'webapp:create_app()'`,
    so both see the same values. In order, later ones winning:

    1. `DEFAULTS` above (and Flask's own defaults);
    2. `<instance folder>/histoseek.cfg`, Python assignments of upper-case web-app settings;
    3. `HISTOSEEK_<NAME>` environment variables of the same names (JSON values: `true`, `30`);
    4. `overrides` (tests, and the worker's copy of what `serve` was given).

    Engine settings (catalog, index, encoder, device, data and instance folders) are not web-app
    settings: they are `engine.config.Settings`, from flags and `HISTOSEEK_*` environment like
    every command's (`overrides["SETTINGS"]`, else `Settings.load()`), and the instance
    folder is `Settings.instance_dir` (`overrides["INSTANCE_PATH"]` for tests and the demo).
    The session key is `SECRET_KEY` when set, else the instance folder's `secret_key` file."""
    env = os.environ if env is None else env
    overrides = dict(overrides or {})
    settings = overrides.get("SETTINGS") or Settings.load(env)
    folder = Path(overrides.get("INSTANCE_PATH") or settings.instance_dir).expanduser().resolve()
    known = set(DEFAULTS) | set(Flask.default_config)
    config = {**Flask.default_config, **DEFAULTS}
    cfg = folder / CONFIG_FILE
    from_file = Config(str(folder))
    from_file.from_pyfile(CONFIG_FILE, silent=True)
    for name, value in from_file.items():
        if name in ENGINE_SETTINGS:
            raise ConfigError(
                f"{cfg}: {name} is not read from this file: set the environment variable {ENV_PREFIX}{name} (or its command-line flag) instead"
            )
        if name not in known:
            raise ConfigError(f"{cfg}: unknown setting {name} (docs/webapp.md lists the web app's settings)")
        config[name] = _checked(name, value, str(cfg))
    for name in sorted(known):
        if env.get(ENV_PREFIX + name):
            config[name] = _checked(name, _parse_env(env[ENV_PREFIX + name]), ENV_PREFIX + name)
    config.update(overrides)
    config["SETTINGS"] = settings
    config["INSTANCE_PATH"] = str(folder)
    if not config.get("SECRET_KEY"):
        config["SECRET_KEY"] = persistent_secret_key(folder)
    return config


def create_app(test_config: dict | None = None) -> Flask:
    """The app, configured by `load_config(test_config)`: gunicorn serves `webapp:create_app()`."""
    config = load_config(test_config)
    app = Flask(__name__, instance_path=config["INSTANCE_PATH"])
    app.config.from_mapping(config)

    from webapp import api, auth, csrf, errors, pages, tiles
    from webapp.state import AppState

    # before any blueprint adds its rules: rules bind their converters when added
    app.url_map.converters["int"] = CatalogIdConverter
    app.json = api.BoundedJSONProvider(app)
    hops = int(app.config["TRUSTED_PROXIES"])
    if hops > 0:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    app.extensions["histoseek"] = AppState(app.config, app.config["SETTINGS"])
    csrf.init_app(app)
    auth.init_app(app)
    errors.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(tiles.bp)
    return app
