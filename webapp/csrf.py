"""CSRF protection for requests authenticated by the session cookie.

A random token lives in the session; every state-changing request (POST, PUT, PATCH,
DELETE) that relies on the cookie must echo it as the form field `csrf_token` or the
`X-CSRF-Token` header. Requests authenticated with an API token (Authorization: Bearer)
carry no cookie authority, so they need none.
"""

from __future__ import annotations

import hmac
import secrets

from flask import abort, g, request, session

SAFE_METHODS = {"GET", "HEAD", "OPTIONS", "TRACE"}
FIELD = "csrf_token"
HEADER = "X-CSRF-Token"


def csrf_token() -> str:
    token = session.get(FIELD)
    if not token:
        token = session[FIELD] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    """Called by the auth hook after it knows how the request was authenticated."""
    if request.method in SAFE_METHODS or g.get("auth_method") == "token":
        return
    sent = request.headers.get(HEADER) or request.form.get(FIELD, "")
    expected = session.get(FIELD, "")
    if not expected or not hmac.compare_digest(sent, expected):
        abort(
            400,
            description="the form has expired or did not come from this site (CSRF check failed); reload the page and try again",
        )


def init_app(app) -> None:
    app.jinja_env.globals["csrf_token"] = csrf_token
