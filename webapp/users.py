"""Users of the web app (stored in the catalog) and the audit log.

Passwords are stored as werkzeug scrypt hashes; API tokens as the sha256 of a random
token shown once (a token has 256 bits of entropy, so a fast hash is enough and lets the
database look it up by its hash).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets

import sqlalchemy as sa
from werkzeug.security import check_password_hash, generate_password_hash

from engine.catalog import Catalog, models
from engine.errors import NotFound

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{2,100}$")
MIN_PASSWORD_CHARS = 8
TOKEN_PREFIX = "hs_"
# Checked against when a username does not exist, so a login takes as long either way.
_DUMMY_HASH = generate_password_hash("not a real password")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(catalog: Catalog, username: str, password: str, *, is_admin: bool = False) -> models.User:
    if not USERNAME_RE.match(username or ""):
        raise ValueError("username must be 2-100 letters, digits or _ . @ -")
    if len(password or "") < MIN_PASSWORD_CHARS:
        raise ValueError(f"password must have at least {MIN_PASSWORD_CHARS} characters")
    with catalog.session() as s:
        if s.scalar(sa.select(models.User).where(models.User.username == username)) is not None:
            raise ValueError(f"user {username!r} exists already; choose another name")
        user = models.User(username=username, password_hash=generate_password_hash(password), is_admin=is_admin)
        s.add(user)
        s.flush()
        s.add(models.AuditEvent(user_id=user.id, action="user_created", detail={"username": username, "is_admin": is_admin}))
    return user


def set_password(catalog: Catalog, username: str, password: str) -> None:
    if len(password or "") < MIN_PASSWORD_CHARS:
        raise ValueError(f"password must have at least {MIN_PASSWORD_CHARS} characters")
    with catalog.session() as s:
        user = _get(s, username)
        user.password_hash = generate_password_hash(password)
        s.add(models.AuditEvent(user_id=user.id, action="password_set", detail={}))


def authenticate(catalog: Catalog, username: str, password: str) -> models.User | None:
    with catalog.session() as s:
        user = s.scalar(sa.select(models.User).where(models.User.username == username))
        if user is None:
            check_password_hash(_DUMMY_HASH, password or "")
            return None
        return user if check_password_hash(user.password_hash, password or "") else None


def issue_token(catalog: Catalog, username: str) -> str:
    """A new API token for the user (replacing any earlier one); shown once, stored hashed."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with catalog.session() as s:
        user = _get(s, username)
        user.api_token_hash = hash_token(token)
        s.add(models.AuditEvent(user_id=user.id, action="token_issued", detail={}))
    return token


def user_for_token(catalog: Catalog, token: str) -> models.User | None:
    if not token or not token.startswith(TOKEN_PREFIX):
        return None
    with catalog.session() as s:
        return s.scalar(sa.select(models.User).where(models.User.api_token_hash == hash_token(token)))


def get_user(catalog: Catalog, user_id: int) -> models.User | None:
    with catalog.session() as s:
        return s.get(models.User, user_id)


def list_users(catalog: Catalog) -> list[models.User]:
    with catalog.session() as s:
        return list(s.scalars(sa.select(models.User).order_by(models.User.username)))


def recent_failed_logins(catalog: Catalog, username: str, window: dt.timedelta) -> int:
    """Failed logins for `username` within the last `window`, from the audit log (shared
    by all workers, unlike a counter in memory)."""
    since = dt.datetime.now(dt.timezone.utc) - window
    event = models.AuditEvent
    with catalog.session() as s:
        return s.scalar(
            sa.select(sa.func.count())
            .select_from(event)
            .where(event.action == "login_failed", event.created_at >= since, event.detail["username"].as_string() == username)
        ) or 0


def record(catalog: Catalog, user_id: int | None, action: str, detail: dict | None = None) -> None:
    """Append an audit event: who did what (search, view, login) and when."""
    with catalog.session() as s:
        s.add(models.AuditEvent(user_id=user_id, action=action, detail=detail or {}))


def _get(session, username: str) -> models.User:
    user = session.scalar(sa.select(models.User).where(models.User.username == username))
    if user is None:
        raise NotFound(f"no user {username!r}; create it with `histoseek-web users add {username}`")
    return user
