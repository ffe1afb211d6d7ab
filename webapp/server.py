"""Running the app under gunicorn from Python (the `serve` command and the demo)."""

from __future__ import annotations

import logging
import socket
import threading

from gunicorn.app.base import BaseApplication
from werkzeug.exceptions import RequestTimeout

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
        app.wsgi_app = BodyDeadline(app.wsgi_app, float(app.config["REQUEST_BODY_TIMEOUT"]))
        threading.Thread(target=warm_search_engine, args=(app,), name="warm-search", daemon=True).start()
        return app


class BodyDeadline:
    """WSGI middleware: a request body must arrive within `seconds` under gunicorn.

    gunicorn's gthread workers read a body on a blocking socket with no time limit, and one
    read() of the app loops until it has all the bytes it asked for, so a client sending a
    byte a second holds a worker thread for as long as it likes; ten of them stalled
    `GET /login` (issue 11). Here a timer armed at the first read of the body shuts the
    socket's reading side at the deadline: the blocked read returns, the request ends with
    408 and the thread is free. A reverse proxy that buffers bodies (docs/webapp.md) keeps
    such clients away from gunicorn altogether; this bounds the damage without one."""

    def __init__(self, app, seconds: float):
        self.app = app
        self.seconds = seconds

    def __call__(self, environ, start_response):
        sock = environ.get("gunicorn.socket")
        if sock is None or self.seconds <= 0 or environ.get("wsgi.input") is None:
            return self.app(environ, start_response)
        guard = _DeadlineInput(environ["wsgi.input"], sock, self.seconds)
        environ["wsgi.input"] = guard
        try:
            return self.app(environ, start_response)  # Flask has read the body by now
        finally:
            guard.disarm()


class _DeadlineInput:
    def __init__(self, stream, sock, seconds: float):
        self._stream, self._sock, self._seconds = stream, sock, seconds
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self.expired = False

    def _expire(self) -> None:
        with self._lock:
            if self._timer is None:  # disarmed meanwhile
                return
            self.expired = True
            try:
                self._sock.shutdown(socket.SHUT_RD)  # wakes the blocked recv with EOF
            except OSError:
                pass

    def disarm(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(description=f"the request body did not arrive within {self._seconds:g} seconds")

    def _call(self, method, *args):
        if self.expired:
            raise self._timeout()
        if self._timer is None:
            self._timer = threading.Timer(self._seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()
        try:
            data = getattr(self._stream, method)(*args)
        except OSError:
            if self.expired:
                raise self._timeout() from None
            raise
        if self.expired:  # what arrived before the deadline is not the whole body
            raise self._timeout()
        return data

    def read(self, *args):
        return self._call("read", *args)

    def readline(self, *args):
        return self._call("readline", *args)

    def readlines(self, *args):
        return self._call("readlines", *args)

    def __iter__(self):
        while line := self.readline():
            yield line


def warm_search_engine(app) -> None:
    """Load the encoder and the index while the worker already serves pages, so the first
    search does not wait seconds for them."""
    try:
        app.extensions["histoseek"].search_engine()
    except HistoseekError as exc:  # e.g. nothing indexed yet: searches will say so
        LOG.info("search engine not loaded at start: %s", exc)


def gunicorn_options(
    host: str, port: int, workers: int, threads: int, timeout: int, access_log: bool, control_socket: str | None = None
) -> dict:
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread",
        "timeout": timeout,
        "graceful_timeout": 10,
        # Slow region searches must not block the upload of the next one.
        "keepalive": 5,
        # Request heads: viewer URLs carry up to 100 boxes (~40 characters each), so the
        # request line may be longer than gunicorn's 4094 default; headers are few and small.
        "limit_request_line": 8190,
        "limit_request_fields": 50,
        "limit_request_field_size": 8190,
        # gunicorn >= 25 opens a control socket at one fixed path per user
        # ($XDG_RUNTIME_DIR/gunicorn.ctl): a second server took over the first one's. Off
        # unless asked for, then at a path of this instance's own.
        "control_socket_disable": control_socket is None,
        "errorlog": "-",
        "loglevel": "info",
    }
    if control_socket is not None:
        options["control_socket"] = control_socket
    if access_log:
        options["accesslog"] = "-"
    return options


def run_gunicorn(
    settings: Settings,
    *,
    host="127.0.0.1",
    port=8000,
    workers=2,
    threads=16,
    timeout=120,
    access_log=False,
    control_socket=None,
    app_config=None,
) -> None:
    HistoseekServer(
        settings, gunicorn_options(host, port, workers, threads, timeout, access_log, control_socket), app_config
    ).run()
