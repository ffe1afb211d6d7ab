"""Login for pages (session cookie), API tokens for scripts, and the rule that every page
and API route except the login page requires one of them."""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, flash, g, redirect, render_template, request, session, url_for

from webapp import users
from webapp.csrf import check_csrf
from webapp.state import state

bp = Blueprint("auth", __name__)

# Endpoints reachable without logging in. Static files are the app's own CSS/JS only.
PUBLIC_ENDPOINTS = {"auth.login", "static"}
# Failed logins counted within this window before further tries are refused (429).
LOGIN_WINDOW = dt.timedelta(minutes=5)
# The session cookie carries the user's session_version under this name; logout, a new
# password, `users revoke` and `users disable` bump the version, so every copy of an older
# cookie stops working at once (a signed cookie cannot be recalled otherwise).
SESSION_VERSION = "session_version"


def safe_next(target: str | None) -> str:
    """Only same-site relative paths are followed after login (no open redirect)."""
    if target:
        parts = urlsplit(target)
        if (
            not parts.scheme
            and not parts.netloc
            and target.startswith("/")
            and not target.startswith("//")
            and "\\" not in target
        ):
            return target
    return url_for("pages.search")


def is_api_request() -> bool:
    return request.blueprint in ("api", "tiles") or request.path.startswith("/api/")


def load_user() -> None:
    """Set g.user and g.auth_method ('token', 'session' or None) for this request."""
    g.user, g.auth_method = None, None
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        user = users.user_for_token(state().catalog, header[len("Bearer ") :].strip())
        if user is None:
            abort(
                401,
                description="the API token is not valid; create a new one with `histoseek-web users token NAME` or on the account page",
            )
        if user.disabled:
            abort(
                401,
                description="this account is disabled; an administrator can enable it with `histoseek-web users enable NAME`",
            )
        g.user, g.auth_method = user, "token"
        return
    user_id = session.get("user_id")
    if user_id is not None:
        user = users.get_user(state().catalog, int(user_id))
        if user is None or user.disabled or session.get(SESSION_VERSION) != user.session_version:
            session.clear()  # logged out elsewhere, password changed, revoked or disabled
        else:
            g.user, g.auth_method = user, "session"


def require_login():
    load_user()
    if request.endpoint not in PUBLIC_ENDPOINTS and g.user is None:
        if is_api_request() or request.endpoint is None:
            abort(
                401, description="log in first: send 'Authorization: Bearer <token>' (histoseek-web users token NAME)"
            )
        return redirect(url_for("auth.login", next=request.full_path if request.query_string else request.path))
    check_csrf()
    return None


def init_app(app) -> None:
    app.before_request(require_login)

    app.after_request(security_headers)

    @app.context_processor
    def inject_user():
        return {"current_user": g.get("user"), "encoder_is_random": state().encoder_is_random}


def security_headers(response):
    """Pages load only this site's own scripts, cannot be framed, and leak no referrer
    (slide names in URLs can identify patients). Pages and API answers carry patient data:
    no cache may keep them (a shared workstation's back button or disk cache), unless the
    view chose a policy itself (slide images: private to the browser); the app's own static
    files stay cacheable."""
    if request.endpoint != "static":
        response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'",
    )
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "POST":
        catalog = state().catalog
        username = request.form.get("username", "").strip()[:100]
        address = request.remote_addr or "unknown"
        user_key, address_key = users.throttle_keys(username, address)
        # Reserve this try before the password is checked: concurrent tries cannot all pass.
        per_user, per_address = users.count_login_try(catalog, (user_key, address_key), LOGIN_WINDOW)
        user_limit = int(current_app.config["LOGIN_MAX_FAILURES"])
        address_limit = int(current_app.config["LOGIN_MAX_FAILURES_PER_ADDRESS"])
        if per_user > user_limit or per_address > address_limit:
            # One audit row when a key starts being throttled, not one per refused try: a
            # flood of tries must not push real events off the audit page.
            for key, count, limit in ((user_key, per_user, user_limit), (address_key, per_address, address_limit)):
                if count == limit + 1:
                    users.record(
                        catalog,
                        None,
                        "login_throttled",
                        {"username": username, "ip": address, "key": key.split(":", 1)[0], "limit": limit},
                    )
            flash(
                f"Too many failed logins from this address; wait {LOGIN_WINDOW.seconds // 60} minutes and try again.",
                "error",
            )
            return render_template("login.html", username=username), 429
        user = users.authenticate(catalog, username, request.form.get("password", ""))
        if user is None:
            # bounded: at most the limit per key and window get here
            users.record(catalog, None, "login_failed", {"username": username, "ip": address})
            flash("Unknown user name or wrong password (or the account is disabled).", "error")
            return render_template("login.html", username=username), 401
        users.forgive_login_try(catalog, user_key, address_key)
        session.clear()
        session.permanent = True
        session["user_id"] = user.id
        session[SESSION_VERSION] = user.session_version
        users.record(catalog, user.id, "login", {"ip": address})
        return redirect(safe_next(request.args.get("next")))
    return render_template("login.html", username="")


@bp.route("/logout", methods=["POST"])
def logout():
    if g.user is not None:
        # ends this session and every copy of its cookie (a copied cookie must not outlive
        # the logout); other browsers of the same user are logged out too
        users.end_sessions(state().catalog, g.user.id)
        users.record(state().catalog, g.user.id, "logout", {})
    session.clear()
    return redirect(url_for("auth.login"))
