"""Writing files so that a crash or a kill never leaves half of one, and hashing them.

Every output of the project (shards, sidecars, features, reports, plots, checkpoints,
slides it makes) goes through `atomic_output`: written to a temporary file beside the target,
flushed to disk, then renamed over it (a rename within one folder is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that choose a format by
    suffix still do); on success it is fsynced and renamed over `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# errno values that mean "this disk or folder cannot take the write", not a bug: the
# operator can act on them (free space, make the folder writable), so they get one line.
_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def write_error_advice(exc: BaseException, what: str) -> str | None:
    """A one-line message for a failed write of `what` (e.g. "the index folder /x") that
    says what to do, or None when `exc` is not a full or read-only disk. Covers OSError
    (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) and SQLite's "database or disk is full" /
    "attempt to write a readonly database" as raised through SQLAlchemy or sqlite3."""
    code = getattr(exc, "errno", None)
    text = str(getattr(exc, "orig", None) or exc).lower()
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if code in _FULL or "database or disk is full" in text or "no space left" in text:
        return f"{what} is full{where}: free space on that disk (or point it elsewhere) and run the command again; nothing half-written was kept"
    if code in _NOT_WRITABLE or "readonly database" in text or "read-only file system" in text:
        return f"{what} is not writable{where}: make it writable for this user (or point it elsewhere) and run the command again"
    return None
