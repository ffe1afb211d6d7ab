"""Build leases: how `indexer build` runs that share a catalog keep off each other's files.

A build writes a shard file first and commits its catalog row after (indexer/writer.py), so
between the two the file is referenced by nothing. The start-up repair of another build
used to take such a file for the leftover of a killed run and delete it; the first build
then committed a row whose file was gone, and every search failed.

Each build (rank 0 under torchrun: the other ranks' files belong to the same job) holds a
`BuildLease` row while it runs: taken before its repair, renewed by a heartbeat thread every
HEARTBEAT_S, deleted at the end. A lease counts as live while its heartbeat is younger than
TIMEOUT_S and, for a lease of this host, while its process exists (a build killed and rerun
at once must not wait TIMEOUT_S to clean up after itself). Repair deletes files that no row
references (orphan shards, temp files) only when no other live lease names the same index
folder; otherwise it leaves them for a later build and says so.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import socket
import threading
from pathlib import Path

import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import BuildLease

LOG = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
# A build whose heartbeat is this old is dead (a crashed machine): 10 missed heartbeats, so
# a busy catalog server or a stalled NFS write cannot make a live build look dead.
TIMEOUT_S = 300.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes (stored as UTC)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def index_key(index_dir: str | Path) -> str:
    """The index folder as leases compare it (absolute, symlinks resolved)."""
    return str(Path(index_dir).expanduser().resolve())


def is_live(lease: BuildLease, *, timeout_s: float = TIMEOUT_S, now: dt.datetime | None = None) -> bool:
    now = now or _now()
    if (now - _aware(lease.heartbeat_at)).total_seconds() > timeout_s:
        return False
    if lease.host == socket.gethostname() and not _pid_alive(lease.pid):
        return False
    return True


def other_live_leases(
    catalog: Catalog, index_dir: str | Path, owner: str | None, *, timeout_s: float = TIMEOUT_S
) -> list[BuildLease]:
    """Live leases of other builds on `index_dir`, read in a transaction of its own (so it
    sees every lease committed before this call, whatever the caller's session saw)."""
    with catalog.session() as s:
        rows = s.scalars(sa.select(BuildLease).where(BuildLease.index_dir == index_key(index_dir))).all()
    return [r for r in rows if r.owner != owner and is_live(r, timeout_s=timeout_s)]


class Lease:
    """A build's lease: `with Lease(catalog, index_dir): ...` (or acquire()/release())."""

    def __init__(
        self, catalog: Catalog, index_dir: str | Path, *, heartbeat_s: float = HEARTBEAT_S, timeout_s: float = TIMEOUT_S
    ):
        self.catalog = catalog
        self.index_dir = index_key(index_dir)
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = f"{self.host}:{self.pid}:{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "Lease":
        with self.catalog.session() as s:
            # leases of dead builds are dropped here, so the table holds the live ones
            for row in s.scalars(sa.select(BuildLease)).all():
                if not is_live(row, timeout_s=self.timeout_s):
                    LOG.info(
                        "dropping the lease of a build that is no longer running: %s (last heartbeat %s)",
                        row.owner,
                        row.heartbeat_at,
                    )
                    s.delete(row)
            s.add(
                BuildLease(
                    owner=self.owner,
                    host=self.host,
                    pid=self.pid,
                    index_dir=self.index_dir,
                    started_at=_now(),
                    heartbeat_at=_now(),
                )
            )
        self._thread = threading.Thread(target=self._beat, name="build-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self.catalog.session() as s:
                    s.execute(sa.update(BuildLease).where(BuildLease.owner == self.owner).values(heartbeat_at=_now()))
            except sa.exc.SQLAlchemyError as exc:  # a catalog hiccup; the next beat tries again
                LOG.warning("build lease heartbeat failed: %s", exc)

    def others(self) -> list[BuildLease]:
        return other_live_leases(self.catalog, self.index_dir, self.owner, timeout_s=self.timeout_s)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            with self.catalog.session() as s:
                s.execute(sa.delete(BuildLease).where(BuildLease.owner == self.owner))
        except sa.exc.SQLAlchemyError as exc:  # e.g. a full catalog: it times out instead
            LOG.warning(
                "could not release the build lease %s (%s); it expires after %.0f s", self.owner, exc, self.timeout_s
            )

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
