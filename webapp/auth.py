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
# Failed logins of one user name within this window before further tries are refused (429).
LOGIN_WINDOW = dt.timedelta(minutes=5)


def safe_next(target: str | None) -> str:
    """Only same-site relative paths are followed after login (no open redirect)."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and not target.startswith("//") and "\\" not in target:
            return target
    return url_for("pages.search")


def is_api_request() -> bool:
    return request.blueprint in ("api", "tiles") or request.path.startswith("/api/")


def load_user() -> None:
    """Set g.user and g.auth_method ('token', 'session' or None) for this request."""
    g.user, g.auth_method = None, None
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        user = users.user_for_token(state().catalog, header[len("Bearer "):].strip())
        if user is None:
            abort(401, description="the API token is not valid; create a new one with `histoseek-web users token NAME` or on the account page")
        g.user, g.auth_method = user, "token"
        return
    user_id = session.get("user_id")
    if user_id is not None:
        user = users.get_user(state().catalog, int(user_id))
        if user is None:
            session.clear()
        else:
            g.user, g.auth_method = user, "session"


def require_login():
    load_user()
    if request.endpoint not in PUBLIC_ENDPOINTS and g.user is None:
        if is_api_request() or request.endpoint is None:
            abort(401, description="log in first: send 'Authorization: Bearer <token>' (histoseek-web users token NAME)")
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
    (slide names in URLs can identify patients)."""
    response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "POST":
        username = request.form.get("username", "").strip()[:100]
        limit = int(current_app.config["LOGIN_MAX_FAILURES"])
        if users.recent_failed_logins(state().catalog, username, LOGIN_WINDOW) >= limit:
            users.record(state().catalog, None, "login_throttled", {"username": username, "ip": request.remote_addr})
            flash(f"Too many failed logins for this user name; wait {LOGIN_WINDOW.seconds // 60} minutes and try again.", "error")
            return render_template("login.html", username=username), 429
        user = users.authenticate(state().catalog, username, request.form.get("password", ""))
        if user is None:
            users.record(state().catalog, None, "login_failed", {"username": username, "ip": request.remote_addr})
            flash("Unknown user name or wrong password.", "error")
            return render_template("login.html", username=username), 401
        session.clear()
        session.permanent = True
        session["user_id"] = user.id
        users.record(state().catalog, user.id, "login", {"ip": request.remote_addr})
        return redirect(safe_next(request.args.get("next")))
    return render_template("login.html", username="")


@bp.route("/logout", methods=["POST"])
def logout():
    if g.user is not None:
        users.record(state().catalog, g.user.id, "logout", {})
    session.clear()
    return redirect(url_for("auth.login"))
