"""One place that turns errors into responses: `{"error", "message"}` JSON with a proper
status code for the API and tiles, a friendly page for everything else."""

from __future__ import annotations

import logging
import re

from flask import jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from engine import errors as E
from webapp.auth import is_api_request

LOG = logging.getLogger(__name__)

# Library errors -> HTTP status. Bad input is the client's (4xx); a missing index, encoder
# or database is the server's configuration (503: it cannot serve searches right now).
STATUS = {
    E.NotFound: 404,
    # the slide file changed or vanished since it was indexed: a conflict with the catalog
    E.SlideChanged: 409,
    E.ImageError: 400,
    E.QueryError: 422,
    E.SlideError: 422,
    E.DatasetError: 422,
    E.ShardError: 503,
    E.EncoderError: 503,
    E.ConfigError: 503,
    E.CatalogError: 503,
}

# What a web user reads of a problem in the server's own set-up (the 503 kinds). The engine's
# messages speak to an operator at a command line ("pass --encoder", "run `indexer verify`",
# HISTOSEEK_* variables, file paths); they go to the server log, and the user reads what the
# problem means here and who can fix it.
EDGE_MESSAGES = {
    E.ConfigError: "searching is not set up on this server yet (no encoder, or a setting is wrong); an administrator finds the reason in the server log",
    E.EncoderError: "the server's encoder cannot be used for this archive (missing, unreadable, or not the one the index was built with); an administrator finds the reason in the server log",
    E.ShardError: "the search index of this server is damaged or not built yet; an administrator finds the reason in the server log",
    E.CatalogError: "the server cannot use its slide catalog right now; try again later, or ask an administrator (the reason is in the server log)",
}


# " at 0x7f3a2c1d9e50" in reprs of objects, and other long hex addresses.
_ADDRESS = re.compile(r"\s+at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{8,}")
# An absolute POSIX path (not part of a URL or a relative path): its folders are dropped
# and its file name kept, which is what a user or operator at the browser can act on.
_ABS_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"<>:,;()]+/)+")


def public_message(message: str) -> str:
    """An error message fit for the client: memory addresses removed and absolute server
    paths cut to their file name. The full text goes to the server log (see init_app)."""
    return _ABS_PATH.sub("", _ADDRESS.sub("", message))


def _nearest(table: dict, exc: E.HistoseekError):
    """The entry of `table` for the most specific class of `exc` it names, else None."""
    return next((table[cls] for cls in type(exc).__mro__ if cls in table), None)


def status_for(exc: E.HistoseekError) -> int:
    status = _nearest(STATUS, exc)
    return 500 if status is None else status


def message_for(exc: E.HistoseekError) -> str:
    """What the client is told of `exc`: the edge wording of a set-up problem, else the
    engine's message fit for the client (public_message)."""
    edge = _nearest(EDGE_MESSAGES, exc)
    return edge if edge is not None else public_message(str(exc))


def error_response(status: int, code: str, message: str):
    if is_api_request():
        response = jsonify({"error": code, "message": message})
        response.status_code = status
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="histoseek"'
        return response
    return render_template("error.html", status=status, code=code, message=message), status


def init_app(app) -> None:
    @app.errorhandler(E.HistoseekError)
    def histoseek_error(exc):
        status = status_for(exc)
        message = message_for(exc)
        if status >= 500:
            LOG.error("%s on %s %s: %s", type(exc).__name__, request.method, request.path, exc)
        elif message != str(exc):
            LOG.info("%s on %s %s: %s", type(exc).__name__, request.method, request.path, exc)
        return error_response(status, exc.code, message)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        code = (exc.name or "error").lower().replace(" ", "_")
        message = public_message(exc.description or exc.name)
        if exc.code == 413:
            limit_mb = app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
            message = f"the upload is larger than the {limit_mb:g} MB allowed; crop or export a smaller region"
        response = error_response(exc.code or 500, code, message)
        if exc.code == 405 and exc.valid_methods is not None:
            response = app.make_response(response)
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected(exc):
        LOG.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal", "an unexpected error happened on the server; it has been logged")
