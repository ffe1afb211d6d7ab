"""Faults of issue 11 on the indexer side, each reproduced first: one build breaking another
(finding 4), a damaged shard stopping all search (5), slide files changed or deleted under
the archive (6), and full or read-only disks (11). Real OpenSlide, SQLite, FAISS and
`indexer` subprocesses; a full disk is a real ENOSPC from /dev/full, a full catalog SQLite's
own limit, a read-only folder `chattr +i` (tests run as root, which ignores permissions)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import (
    INDEXED,
    MISSING,
    SHARD_OK,
    SHARD_QUARANTINED,
    BuildLease,
    Shard,
    Slide,
    SlideEncoding,
    Tile,
)
from engine.errors import CatalogError, ConfigError, ShardError
from engine.search import SearchEngine
from engine.shards import read_shard, sidecar_of
from indexer.build import build_archive
from indexer.lease import Lease, index_key
from indexer.verify import verify_index
from tests.indexed_archive import archive_settings
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff

ENCODER = "random:resnet18"
BIN = Path(sys.executable).parent


def _slide(path: Path, seed: int, h: int = 700, w: int = 900) -> Path:
    write_pyramidal_tiff(path, tissue_blobs(h, w, seed=seed, n_blobs=3, radius=(0.3, 0.45)), mpp=0.5, min_level_px=256)
    return path


@pytest.fixture
def archive(tmp_path) -> Path:
    root = tmp_path / "archive"
    for i, name in enumerate(["a.tiff", "b.tiff", "c.tiff"]):
        _slide(root / name, seed=20 + i)
    return root


def _build(settings, archive, **kwargs):
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("batch_size", 8)
    return build_archive(settings, archive, **kwargs)


def _rows(settings, query):
    cat = Catalog(settings.catalog_url)
    try:
        with cat.session() as s:
            return s.execute(query).all()
    finally:
        cat.dispose()


def _verify(settings, **kwargs):
    cat = Catalog(settings.catalog_url)
    try:
        return verify_index(cat, settings.index_dir, **kwargs)
    finally:
        cat.dispose()


def _shard_of(settings, slide_name: str) -> Path:
    [(rel,)] = _rows(
        settings,
        sa.select(Shard.path)
        .join(Tile, Tile.shard_id == Shard.id)
        .join(Slide, Slide.id == Tile.slide_id)
        .where(Slide.path.endswith(slide_name))
        .distinct(),
    )
    return Path(settings.index_dir) / rel


# -- finding 4: builds sharing a catalog --------------------------------------------------


def test_repair_leaves_a_live_builds_uncommitted_shard_alone(tmp_path, archive):
    """The interleaving of the finding, made exact: build A has written a shard file (and a
    temp file) it has not committed yet and holds its lease; build B starts on another
    folder with the same catalog and index. B's repair must leave A's files alone; once A
    is gone (lease released) a build removes what stayed unreferenced."""
    settings = archive_settings(tmp_path, ENCODER)
    _build(settings, archive)
    folder = _shard_of(settings, "a.tiff").parent
    a_shard = folder / "slide-000000099.faiss"  # A's slide 99, written, not yet committed
    shutil.copy(_shard_of(settings, "a.tiff"), a_shard)
    shutil.copy(sidecar_of(_shard_of(settings, "a.tiff")), sidecar_of(a_shard))
    a_temp = folder / ".slide-000000098.4242.tmp.faiss"
    a_temp.write_bytes(b"half written by build A")
    other = tmp_path / "other"
    _slide(other / "d.tiff", seed=30)

    cat = Catalog(settings.catalog_url)
    lease_a = Lease(cat, settings.index_dir).acquire()
    try:
        b = _build(settings, other)
        assert b.indexed == 1
        assert a_shard.is_file() and sidecar_of(a_shard).is_file() and a_temp.is_file(), (
            "build B deleted build A's work in progress"
        )
        assert any("another build is running" in n and lease_a.owner in n for n in b.notes), b.notes
        report = _verify(settings)  # verify says why the file is there
        assert any("slide-000000099.faiss" in p and "another build is running" in p for p in report.problems)
    finally:
        lease_a.release()
        cat.dispose()
    after = _build(settings, other)
    assert not a_shard.exists() and not sidecar_of(a_shard).exists() and not a_temp.exists()
    assert any("no catalog row references" in n for n in after.notes)
    assert _verify(settings).ok
    assert _rows(settings, sa.select(BuildLease.owner)) == []  # every build released its lease


def test_dead_leases_do_not_block_repair(tmp_path, archive):
    """A build that was killed leaves its lease row: it must not keep orphans forever. Dead
    on this host = its process is gone; anywhere = its heartbeat is older than the timeout."""
    settings = archive_settings(tmp_path, ENCODER)
    _build(settings, archive)
    folder = _shard_of(settings, "a.tiff").parent
    dead = _gone_pid()
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    cat = Catalog(settings.catalog_url)
    with cat.session() as s:
        s.add(
            BuildLease(
                owner=f"{socket.gethostname()}:{dead}:x",
                host=socket.gethostname(),
                pid=dead,
                index_dir=index_key(settings.index_dir),
            )
        )
        s.add(
            BuildLease(
                owner="elsewhere:1:y",
                host="elsewhere",
                pid=1,
                index_dir=index_key(settings.index_dir),
                started_at=old,
                heartbeat_at=old,
            )
        )
    cat.dispose()
    orphan = folder / ".slide-000000097.1.tmp.faiss"
    orphan.write_bytes(b"left by a killed build")
    _build(settings, archive)
    assert not orphan.exists()
    assert _rows(settings, sa.select(BuildLease.owner)) == []


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the kernel reuses it, far later)


def test_commit_refuses_a_row_whose_file_is_gone(tmp_path, archive):
    """The writer checks its file inside the commit's transaction: deleted once in between
    (as the old repair did), it is written again; deleted every time, the slide fails with
    a message and no row points to a missing file."""
    settings = archive_settings(tmp_path, ENCODER)
    deletions = []

    def delete_shard_files(session, flush_context, instances):
        # the writer's last flush before its commit marks the slide's encoding indexed:
        # delete the shard it has just written, as another process would
        for obj in list(session.dirty):
            if (
                isinstance(obj, SlideEncoding)
                and sa.inspect(obj).attrs.indexed_at.history.has_changes()
                and budget[0] > 0
            ):
                budget[0] -= 1
                for file in Path(settings.index_dir).rglob(f"slide-{obj.slide_id:09d}.faiss"):
                    file.unlink()
                    deletions.append(file.name)

    budget = [1]
    sa.event.listen(sa.orm.Session, "before_flush", delete_shard_files)
    try:
        once = _build(settings, archive)
        assert deletions and once.indexed == 3 and once.failed == 0
        assert _verify(settings).ok  # rewritten before the commit

        budget[0] = 100
        deletions.clear()
        _slide(archive / "e.tiff", seed=40)
        always = _build(settings, archive)
    finally:
        sa.event.remove(sa.orm.Session, "before_flush", delete_shard_files)
    assert len(deletions) == 2 and always.failed == 1
    assert "deleted or replaced twice between its write and its commit" in always.failures[0][1]
    assert _verify(settings).ok  # no shard row without its file


@pytest.mark.slow
def test_two_real_builds_on_two_folders_share_a_catalog(tmp_path):
    """End to end: two `indexer build` processes at once, two folders, one catalog and index
    folder; then `indexer verify` passes and search answers with slides of both."""
    one, two = tmp_path / "one", tmp_path / "two"
    for i in range(3):
        _slide(one / f"one-{i}.tiff", seed=50 + i)
        _slide(two / f"two-{i}.tiff", seed=60 + i)
    common = [
        "--catalog",
        f"sqlite:///{tmp_path / 'catalog.sqlite'}",
        "--index-dir",
        str(tmp_path / "index"),
        "--encoder",
        ENCODER,
        "--device",
        "cpu",
    ]
    # the schema first, so the two processes do not both create it
    subprocess.run([BIN / "indexer", "status", *common], check=True, capture_output=True)
    procs = [
        subprocess.Popen(
            [
                BIN / "indexer",
                "build",
                str(folder),
                "--workers",
                "0",
                "--batch-size",
                "4",
                "--min-tissue",
                "0.1",
                "--no-progress",
                *common,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in (one, two)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    verify = subprocess.run([BIN / "indexer", "verify", *common], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "6 slides" in verify.stdout
    search = subprocess.run(
        [BIN / "engine", "search", "--slide", "1", "--json", "--top-k", "5", *common], capture_output=True, text=True
    )
    assert search.returncode == 0, search.stderr
    doc = json.loads(search.stdout)
    assert len(doc["results"]) == 5 and doc["degraded"] is False


# -- finding 5: a damaged shard -----------------------------------------------------------


def _engine(settings) -> SearchEngine:
    return SearchEngine(settings)


def test_damaged_shard_is_quarantined_and_search_answers_from_the_rest(tmp_path, archive):
    settings = archive_settings(tmp_path, ENCODER)
    _build(settings, archive)
    bad = _shard_of(settings, "b.tiff")
    data = bytearray(bad.read_bytes())
    data[:8] = b"garbage!"  # a corrupt header: FAISS cannot read it
    bad.write_bytes(bytes(data))

    engine = _engine(settings)  # before: ShardError on every search (503)
    (bad_id,) = _rows(settings, sa.select(Slide.id).where(Slide.path.endswith("b.tiff")))[0]
    (a_id,) = _rows(settings, sa.select(Slide.id).where(Slide.path.endswith("a.tiff")))[0]
    doc = engine.search_slide(a_id, top_k=5).to_json()
    assert doc["degraded"] is True and "quarantined" in doc["warnings"][0]
    assert [r["slide"]["path"].endswith("c.tiff") for r in doc["results"]] == [True]  # b left out, c still found
    [(status, error)] = _rows(settings, sa.select(Shard.status, Shard.error).where(Shard.path.endswith(bad.name)))
    assert status == SHARD_QUARANTINED and "damaged" in error

    # not tried again on the next refresh (a web worker refreshes when the catalog changes)
    opened = []
    sys.addaudithook(
        lambda event, args: opened.append(args[0]) if event == "open" and str(args[0]) == str(bad) else None
    )
    engine.refresh()
    engine.refresh()
    assert opened == []

    report = _verify(settings)
    assert not report.ok and any("quarantined" in p for p in report.problems)
    repaired = _build(settings, archive)  # before: "skipped 3 already indexed", nothing repaired
    assert repaired.indexed == 1 and any("quarantined" in n for n in repaired.notes)
    assert _verify(settings).ok
    assert _rows(settings, sa.select(Shard.status).distinct()) == [(SHARD_OK,)]
    engine.refresh()
    doc = engine.search_slide(a_id, top_k=5).to_json()
    assert doc["degraded"] is False and bad_id in [r["slide"]["id"] for r in doc["results"]]


def test_corrupt_vector_data_is_refused_by_checksum_and_by_norm(tmp_path, archive):
    """One flipped exponent bit gave a vector of norm 1.6e7 that loaded silently."""
    settings = archive_settings(tmp_path, ENCODER)
    _build(settings, archive)
    bad = _shard_of(settings, "c.tiff")
    [(sha,)] = _rows(settings, sa.select(Shard.sha256).where(Shard.path.endswith(bad.name)))
    data = bytearray(bad.read_bytes())
    data[82 : 82 + 4] = np.float32(1.6e7).tobytes()  # the first float of the first vector
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256 differs"):
        read_shard(bad, sha)
    with pytest.raises(ShardError, match="not unit length"):
        read_shard(bad)  # even without the checksum
    report = _verify(settings)  # verify records it, so build repairs it
    assert any("quarantined" in p for p in report.problems)
    assert _build(settings, archive).indexed == 1
    assert _verify(settings).ok


def test_truncated_shard_is_repaired_by_build_without_verify(tmp_path, archive):
    settings = archive_settings(tmp_path, ENCODER)
    _build(settings, archive)
    bad = _shard_of(settings, "a.tiff")
    bad.write_bytes(bad.read_bytes()[:-100])
    again = _build(settings, archive)
    assert again.indexed == 1 and any("bytes" in n and "expected" in n for n in again.notes)
    assert _verify(settings).ok


# -- finding 6: slide files that change under the archive ---------------------------------


def test_overwritten_slide_file_leaves_one_row_per_path(tmp_path, archive):
    settings = archive_settings(tmp_path, ENCODER)
    _build(settings, archive)
    shutil.copyfile(archive / "b.tiff", archive / "a.tiff")  # a.tiff now holds b's bytes
    report = _verify(settings)  # before: exit 0
    assert any("a.tiff" in p and "changed since it was indexed" in p for p in report.problems)

    again = _build(settings, archive)  # before: "moved: b -> a", two indexed rows for a.tiff
    assert not any("moved" in n for n in again.notes)
    assert any("a.tiff" in n and "changed since" in n for n in again.notes)
    assert any("same content as b.tiff" in n for n in again.notes)
    paths = [p for (p,) in _rows(settings, sa.select(Slide.path).where(Slide.status == INDEXED))]
    assert sorted(Path(p).name for p in paths) == ["b.tiff", "c.tiff"]
    assert len(_rows(settings, sa.select(Slide.id).where(Slide.path.endswith("a.tiff")))) == 0
    assert _verify(settings).ok


def test_deleted_slide_is_marked_missing_and_leaves_search(tmp_path, archive):
    settings = archive_settings(tmp_path, ENCODER)
    _build(settings, archive)
    (c_id,) = _rows(settings, sa.select(Slide.id).where(Slide.path.endswith("c.tiff")))[0]
    (a_id,) = _rows(settings, sa.select(Slide.id).where(Slide.path.endswith("a.tiff")))[0]
    kept = tmp_path / "kept.tiff"
    shutil.move(archive / "c.tiff", kept)
    report = _verify(settings)  # before: exit 0
    assert any("c.tiff" in p and "missing" in p for p in report.problems)

    gone = _build(settings, archive)
    assert any("marked missing" in n for n in gone.notes)
    assert _rows(settings, sa.select(Slide.status).where(Slide.id == c_id)) == [(MISSING,)]
    doc = _engine(settings).search_slide(a_id, top_k=5).to_json()
    assert c_id not in [r["slide"]["id"] for r in doc["results"]]  # before: still in results
    assert doc["degraded"] is True and "missing" in doc["warnings"][0]
    assert not _verify(settings).ok

    shutil.move(kept, archive / "c.tiff")  # back (a share mounted again): no re-embedding
    back = _build(settings, archive)
    assert back.indexed == 0 and any("back in the archive" in n for n in back.notes)
    assert _rows(settings, sa.select(Slide.status).where(Slide.id == c_id)) == [(INDEXED,)]
    assert _verify(settings).ok
    doc = _engine(settings).search_slide(a_id, top_k=5).to_json()
    assert c_id in [r["slide"]["id"] for r in doc["results"]] and doc["degraded"] is False


# -- finding 11: full and read-only disks -------------------------------------------------


def test_full_index_disk_gives_one_line_and_no_orphan_sidecar(tmp_path, archive):
    """A real ENOSPC: the shard's temp file is a link to /dev/full."""
    settings = archive_settings(tmp_path, ENCODER)
    cat = Catalog(settings.catalog_url)  # an encoder folder to put the links in
    cat.dispose()
    from engine.encoder import Encoder
    from engine.shards import ShardEncoder, encoder_dir

    enc = Encoder.from_spec(ENCODER, device="cpu")
    folder = encoder_dir(
        settings.index_dir,
        ShardEncoder(enc.info.name, enc.info.checkpoint_sha256, enc.dim, settings.target_mpp, settings.tile_px),
    )

    def disk_full_after_first_shard(session):
        # once the first shard is committed, the next shards' temp files are /dev/full
        # (earlier, the build's start-up repair would delete them as leftovers)
        if folder.is_dir() and list(folder.glob("slide-*.faiss")):
            for slide_id in range(1, 4):
                link = folder / f".slide-{slide_id:09d}.{os.getpid()}.tmp.faiss"
                if not (folder / f"slide-{slide_id:09d}.faiss").exists() and not link.is_symlink():
                    os.symlink("/dev/full", link)

    sa.event.listen(sa.orm.Session, "after_commit", disk_full_after_first_shard)
    try:
        with pytest.raises(ConfigError) as err:
            _build(settings, archive, encoder=enc)
    finally:
        sa.event.remove(sa.orm.Session, "after_commit", disk_full_after_first_shard)
    for link in folder.glob(".*.tmp.faiss"):
        assert link.is_symlink()  # the test's own links (remade at the lease's release)
        link.unlink()
    message = str(err.value)
    assert "is full" in message and "free space" in message and "\n" not in message
    assert sorted(p.name for p in folder.iterdir()) == ["slide-000000001.faiss", "slide-000000001.json"], (
        "orphan sidecar or temp file left behind"
    )
    assert _verify(settings).ok
    assert _rows(settings, sa.select(BuildLease.owner)) == []
    assert _build(settings, archive, encoder=enc).indexed == 2  # space freed: it resumes


@pytest.mark.slow
def test_full_catalog_gives_one_line_and_no_orphan_shard(tmp_path):
    """SQLite's own "database or disk is full", from a page limit on the catalog file: the
    empty catalog's pages have room for the slide's registration, not for its tiles (16 px
    tiles: some 300 rows), so the shard is written and its commit fails."""
    settings = archive_settings(tmp_path, ENCODER, tile_px=16)
    archive = tmp_path / "archive"
    _slide(archive / "x.tiff", seed=70)
    cat = Catalog(settings.catalog_url)
    with cat.engine.connect() as conn:
        conn.execute(sa.text("VACUUM"))
        pages = conn.execute(sa.text("PRAGMA page_count")).scalar()
    cat.dispose()

    def limit(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA max_page_count = {pages}")
        cur.close()

    sa.event.listen(sa.engine.Engine, "connect", limit)
    try:
        with pytest.raises(CatalogError) as err:
            _build(settings, archive, batch_size=128)
    finally:
        sa.event.remove(sa.engine.Engine, "connect", limit)
    assert "catalog database" in str(err.value) and "is full" in str(err.value) and "\n" not in str(err.value)
    assert [
        p.name for p in Path(settings.index_dir).rglob("*") if p.is_file() and p.name != "fingerprints.json"
    ] == [], "a shard without its row was left"
    assert _verify(settings).ok


def _immutable(path: Path, on: bool) -> bool:
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_read_only_index_folder_gives_one_line(tmp_path, archive):
    settings = archive_settings(tmp_path, ENCODER)
    _build(settings, archive)
    index = Path(settings.index_dir)
    if not _immutable(index, True):
        pytest.skip("chattr +i is not supported here")
    try:
        (index / "probe").touch()
        pytest.fail("chattr +i did not make the folder read-only")
    except PermissionError:
        pass
    try:
        _slide(archive / "d.tiff", seed=80)
        common = ["--catalog", settings.catalog_url, "--index-dir", str(index), "--encoder", ENCODER, "--device", "cpu"]
        cli = subprocess.run(
            [BIN / "indexer", "build", str(archive), "--workers", "0", "--no-progress", *common],
            capture_output=True,
            text=True,
        )
    finally:
        _immutable(index, False)
    assert cli.returncode != 0 and "Traceback" not in cli.stderr
    assert "is not writable" in cli.stderr and "make it writable" in cli.stderr, cli.stderr


def test_verify_reports_orphan_sidecars_and_temp_files(tmp_path, archive):
    settings = archive_settings(tmp_path, ENCODER)
    _build(settings, archive)
    folder = _shard_of(settings, "a.tiff").parent
    (folder / "slide-000000077.json").write_text("{}")
    (folder / ".slide-000000078.123.tmp.faiss").write_bytes(b"half")
    problems = _verify(settings).problems
    assert any("sidecar" in p and "slide-000000077.json" in p for p in problems)
    assert any("temp file" in p and ".slide-000000078" in p for p in problems)
    _build(settings, archive)
    assert _verify(settings).ok
