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
from engine.errors import NotFound, QueryError

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{2,100}$")
MIN_PASSWORD_CHARS = 8
TOKEN_PREFIX = "hs_"
# Checked against when a username does not exist, so a login takes as long either way.
_DUMMY_HASH = generate_password_hash("not a real password")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(catalog: Catalog, username: str, password: str, *, is_admin: bool = False) -> models.User:
    if not USERNAME_RE.match(username or ""):
        raise QueryError("username must be 2-100 letters, digits or _ . @ -")
    if len(password or "") < MIN_PASSWORD_CHARS:
        raise QueryError(f"password must have at least {MIN_PASSWORD_CHARS} characters")
    with catalog.session() as s:
        if s.scalar(sa.select(models.User).where(models.User.username == username)) is not None:
            raise QueryError(f"user {username!r} exists already; choose another name")
        user = models.User(username=username, password_hash=generate_password_hash(password), is_admin=is_admin)
        s.add(user)
        s.flush()
        s.add(
            models.AuditEvent(
                user_id=user.id, action="user_created", detail={"username": username, "is_admin": is_admin}
            )
        )
    return user


def set_password(catalog: Catalog, username: str, password: str) -> None:
    if len(password or "") < MIN_PASSWORD_CHARS:
        raise QueryError(f"password must have at least {MIN_PASSWORD_CHARS} characters")
    with catalog.session() as s:
        user = _get(s, username)
        user.password_hash = generate_password_hash(password)
        # a new password ends every session signed in with the old one (a stolen cookie too)
        _bump_session_version(s, user.id)
        s.add(models.AuditEvent(user_id=user.id, action="password_set", detail={}))


def authenticate(catalog: Catalog, username: str, password: str) -> models.User | None:
    """The user, if the password is right and the account is not disabled (a disabled
    account's password is still checked, so the answer takes as long either way)."""
    with catalog.session() as s:
        user = s.scalar(sa.select(models.User).where(models.User.username == username))
        if user is None:
            check_password_hash(_DUMMY_HASH, password or "")
            return None
        ok = check_password_hash(user.password_hash, password or "")
        return user if ok and not user.disabled else None


def _bump_session_version(s, user_id: int) -> None:
    # one UPDATE, so two concurrent logouts cannot both write the same new version
    s.execute(
        sa.update(models.User).where(models.User.id == user_id).values(session_version=models.User.session_version + 1)
    )


def end_sessions(catalog: Catalog, user_id: int) -> None:
    """Invalidate every session cookie of the user, including copies of it (logout)."""
    with catalog.session() as s:
        _bump_session_version(s, user_id)


def revoke(catalog: Catalog, username: str) -> None:
    """End all of the user's sessions and drop the API token (`users revoke`)."""
    with catalog.session() as s:
        user = _get(s, username)
        user.api_token_hash = None
        s.flush()
        _bump_session_version(s, user.id)
        s.add(models.AuditEvent(user_id=user.id, action="user_revoked", detail={}))


def set_disabled(catalog: Catalog, username: str, disabled: bool) -> None:
    """Disable (no login, token or session works) or enable the user. Enabling does not bring
    old sessions back: disabling also ends them."""
    with catalog.session() as s:
        user = _get(s, username)
        user.disabled = disabled
        s.flush()
        if disabled:
            _bump_session_version(s, user.id)
        s.add(models.AuditEvent(user_id=user.id, action="user_disabled" if disabled else "user_enabled", detail={}))


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


# -- login throttling --------------------------------------------------------------------
# Every login try first reserves a slot: one UPDATE adds 1 to its keys' counters and returns
# the new counts, in one transaction, and only then is the password checked. Concurrent tries
# therefore cannot all read "9 failures" and all be checked (issue 11: 19 of 60 concurrent
# tries were checked against a limit of 10). A successful login gives its reservation back.


def throttle_keys(username: str, address: str) -> tuple[str, str]:
    """The two counters a login try counts against: this user name from this address (so a
    stranger elsewhere cannot lock the user out), and this address for any user name (so one
    address cannot try 10 passwords for each of many names)."""
    return f"user:{username}@{address}"[:300], f"addr:{address}"[:300]


def count_login_try(catalog: Catalog, keys, window: dt.timedelta) -> list[int]:
    """Atomically add one try to each key's counter in its current window (a window older than
    `window` starts over at 1) and return the new counts, in the order of `keys`."""
    table = models.LoginThrottle
    now = dt.datetime.now(dt.timezone.utc)
    expired = table.window_start < now - window
    for _ in range(5):
        counts = []
        try:
            with catalog.session() as s:
                for key in keys:
                    # increment-then-read in the same statement: portable to SQLite (3.35+)
                    # and PostgreSQL, and atomic on both (the row stays locked until commit)
                    count = s.execute(
                        sa.update(table)
                        .where(table.key == key)
                        .values(
                            failures=sa.case((expired, 1), else_=table.failures + 1),
                            window_start=sa.case((expired, now), else_=table.window_start),
                        )
                        .returning(table.failures)
                    ).scalar()
                    if count is None:  # first try of this key: two may race to insert it
                        s.add(table(key=key, window_start=now, failures=1))
                        s.flush()
                        count = 1
                    counts.append(count)
            return counts
        except sa.exc.IntegrityError:
            continue  # another try inserted the key first; its row exists now
    raise RuntimeError(f"could not count a login try for {keys!r}")


def forgive_login_try(catalog: Catalog, user_key: str, address_key: str) -> None:
    """After a successful login: forget this user's failures from this address and give back
    the address's reserved slot (an attacker's own account cannot reset the address count)."""
    table = models.LoginThrottle
    with catalog.session() as s:
        s.execute(sa.delete(table).where(table.key == user_key))
        s.execute(
            sa.update(table).where(table.key == address_key, table.failures > 0).values(failures=table.failures - 1)
        )


def record(catalog: Catalog, user_id: int | None, action: str, detail: dict | None = None) -> None:
    """Append an audit event: who did what (search, view, login) and when."""
    with catalog.session() as s:
        s.add(models.AuditEvent(user_id=user_id, action=action, detail=detail or {}))


def _get(session, username: str) -> models.User:
    user = session.scalar(sa.select(models.User).where(models.User.username == username))
    if user is None:
        raise NotFound(f"no user {username!r}; create it with `histoseek-web users add {username}`")
    return user
