"""`indexer build` on small synthetic archives: catalog rows, shard files, metadata, reruns,
moved and changed files, repair of what a killed run leaves, and the CLI around it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from engine.catalog.db import Catalog
from engine.catalog.models import FAILED, INDEXED, EncoderRecord, Shard, Slide, Tile
from engine.config import Settings
from engine.distributed import DistContext
from engine.errors import ConfigError, NotFound
from engine.shards import shard_arrays, write_shard
from indexer.build import build_archive
from indexer.cli import main as indexer_cli
from indexer.remove import remove_slides
from indexer.verify import verify_index
from indexer.writer import TILE_ID_STRIDE
from tests.indexed_archive import archive_settings, write_metadata_csv
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff

ENCODER = "random:resnet18"


def _settings(tmp_path: Path, encoder: str = ENCODER, **extra) -> Settings:
    return archive_settings(tmp_path, encoder, **extra)


def _build(settings, archive, **kwargs):
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("batch_size", 8)
    return build_archive(settings, archive, **kwargs)


@pytest.fixture
def archive(tmp_path) -> Path:
    """Three tissue slides (one in a sub-folder), one without mpp, one non-slide file and
    one file with a slide extension that is no slide."""
    root = tmp_path / "archive"
    write_pyramidal_tiff(
        root / "a.tiff", tissue_blobs(900, 1400, seed=1, n_blobs=3, radius=(0.3, 0.45)), mpp=0.5, min_level_px=256
    )
    write_pyramidal_tiff(
        root / "b.tiff", tissue_blobs(900, 900, seed=2, n_blobs=3, radius=(0.3, 0.45)), mpp=0.5, min_level_px=256
    )
    write_pyramidal_tiff(
        root / "sub" / "c.tif",
        tissue_blobs(700, 1000, seed=3, n_blobs=3, radius=(0.3, 0.45)),
        mpp=0.5,
        min_level_px=256,
    )
    write_pyramidal_tiff(root / "nompp.tiff", tissue_blobs(500, 500, seed=4), mpp=None)
    (root / "notes.csv").write_text("not,a,slide\n")
    (root / "garbage.svs").write_bytes(b"this is not a slide" * 10)
    return root


def _snapshot(settings: Settings) -> dict:
    """Slides (by fingerprint), tiles (id, fingerprint, x, y, size) and vectors by id."""
    cat = Catalog(settings.catalog_url)
    with cat.session() as s:
        slides = {sl.fingerprint: (sl.status, sl.tile_count, Path(sl.path).name) for sl in s.scalars(sa.select(Slide))}
        fps = dict(s.execute(sa.select(Slide.id, Slide.fingerprint)).all())
        tiles = sorted((t.id, fps[t.slide_id], t.x, t.y, t.size) for t in s.scalars(sa.select(Tile)))
        shard_paths = list(s.scalars(sa.select(Shard.path)))
    cat.dispose()
    vectors = {}
    for rel in shard_paths:
        ids, xb = shard_arrays(Path(settings.index_dir) / rel)
        vectors.update(zip(ids.tolist(), xb))
    return {"slides": slides, "tiles": tiles, "vectors": vectors}


def test_build_indexes_slides_and_records_failures(tmp_path, archive):
    settings = _settings(tmp_path)
    csv = write_metadata_csv(
        tmp_path / "meta.csv",
        [
            {
                "slide": "a.tiff",
                "patient": "P1",
                "site": "colon",
                "diagnosis": "adenocarcinoma",
                "label": "TUM",
                "stain": "HE",
            },
            {"slide": "sub/c.tif", "patient": "P2", "label": "NORM", "collection": "study-1"},
            {"slide": "nowhere.svs", "patient": "P9"},
        ],
    )
    summary = _build(settings, archive, metadata=csv, collection="archive-2024")
    assert (summary.indexed, summary.failed, summary.skipped) == (3, 2, 0)
    failures = dict((Path(p).name, e) for p, e in summary.failures)
    assert "default resolution" in failures["nompp.tiff"]
    assert "not a whole-slide format" in failures["garbage.svs"]
    assert any("nowhere.svs" in note for note in summary.notes)

    cat = Catalog(settings.catalog_url)
    with cat.session() as s:
        rows = {Path(sl.path).name: sl for sl in s.scalars(sa.select(Slide))}
        assert set(rows) == {"a.tiff", "b.tiff", "c.tif", "nompp.tiff", "garbage.svs"}
        a, b, c = rows["a.tiff"], rows["b.tiff"], rows["c.tif"]
        assert (a.patient, a.site, a.diagnosis, a.label, a.extra) == (
            "P1",
            "colon",
            "adenocarcinoma",
            "TUM",
            {"stain": "HE"},
        )
        assert (a.collection, b.collection, c.collection) == ("archive-2024", "archive-2024", "study-1")
        assert (a.mpp, a.mpp_source, a.width, a.height) == (0.5, "metadata", 1400, 900)
        assert rows["nompp.tiff"].status == FAILED and rows["nompp.tiff"].tile_count == 0
        for sl in (a, b, c):
            assert sl.status == INDEXED and sl.tile_count > 0 and sl.encoder_id is not None
            tiles = list(s.scalars(sa.select(Tile).where(Tile.slide_id == sl.id).order_by(Tile.id)))
            assert len(tiles) == sl.tile_count
            # one encoding of the slide; its id is the tile ids' base (indexer/writer.py)
            (encoding_id,) = {t.encoding_id for t in tiles}
            assert [t.id for t in tiles] == [encoding_id * TILE_ID_STRIDE + i for i in range(len(tiles))]
            assert all(t.size == 448 and t.x % 448 == 0 and t.y % 448 == 0 and t.tissue_fraction >= 0.5 for t in tiles)
    cat.dispose()

    snap = _snapshot(settings)
    norms = np.linalg.norm(np.stack(list(snap["vectors"].values())), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)
    assert sorted(snap["vectors"]) == [t[0] for t in snap["tiles"]]
    report = verify_index(Catalog(settings.catalog_url), settings.index_dir)
    assert report.ok, report.problems
    assert report.vectors == len(snap["tiles"])


def test_vectors_are_the_encoders_features_of_the_tiles(tmp_path, archive):
    """A stored vector is the L2-normalised embedding of the tile read at its coordinates."""
    import torch

    from engine.encoder import Encoder, l2_normalise
    from engine.slides import read_tile

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(archive / "b.tiff", one / "b.tiff")
    settings = _settings(tmp_path, precision="fp32")
    _build(settings, one)
    snap = _snapshot(settings)
    enc = Encoder.from_spec(ENCODER, device="cpu", precision="fp32")
    for tile_id, _, x, y, size in snap["tiles"][:2]:
        img = np.asarray(read_tile(one / "b.tiff", x, y, size, 224))
        want = l2_normalise(enc.embed(torch.from_numpy(img.transpose(2, 0, 1).copy())[None]))[0]
        assert np.allclose(snap["vectors"][tile_id], want, atol=1e-5)


def test_rerun_skips_moved_is_followed_changed_is_reindexed(tmp_path, archive):
    settings = _settings(tmp_path)
    _build(settings, archive)
    first = _snapshot(settings)

    again = _build(settings, archive)
    assert (again.indexed, again.skipped, again.failed) == (0, 3, 2)
    assert _snapshot(settings)["tiles"] == first["tiles"]

    (archive / "moved").mkdir()
    shutil.move(archive / "b.tiff", archive / "moved" / "b-renamed.tiff")
    moved = _build(settings, archive)
    assert (moved.indexed, moved.skipped) == (0, 3)
    assert any("moved:" in n and "b-renamed.tiff" in n for n in moved.notes)
    after_move = _snapshot(settings)
    assert after_move["tiles"] == first["tiles"]
    assert sum(1 for v in after_move["slides"].values() if v[2] == "b-renamed.tiff") == 1

    write_pyramidal_tiff(
        archive / "a.tiff", tissue_blobs(900, 1400, seed=11, n_blobs=3, radius=(0.3, 0.45)), mpp=0.5, min_level_px=256
    )
    changed = _build(settings, archive)
    assert changed.indexed == 1 and any("changed since" in n for n in changed.notes)
    final = _snapshot(settings)
    assert sum(1 for v in final["slides"].values() if v[2] == "a.tiff") == 1
    assert len(final["slides"]) == len(first["slides"])
    assert verify_index(Catalog(settings.catalog_url), settings.index_dir).ok


def test_default_mpp_and_min_tissue(tmp_path, archive):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(archive / "nompp.tiff", one / "nompp.tiff")
    settings = _settings(tmp_path)
    strict = _build(settings, one, min_tissue=1.0, default_mpp=0.5)
    assert strict.failed == 1 and "lower the minimum tissue fraction" in strict.failures[0][1]
    loose = _build(settings, one, min_tissue=0.1, default_mpp=0.5)
    assert (loose.indexed, loose.failed, loose.tiles) == (1, 0, 1)
    cat = Catalog(settings.catalog_url)
    with cat.session() as s:
        assert s.scalar(sa.select(Slide.mpp_source)) == "default"
    cat.dispose()


def test_repair_after_kill_between_shard_write_and_commit(tmp_path, archive):
    """The states a SIGKILL can leave, made exactly: a shard file written for a slide whose
    commit never happened, and a half-written temp file. The rerun removes both and ends
    equal to a clean build."""
    settings = _settings(tmp_path)
    _build(settings, archive)
    want = _snapshot(settings)
    cat = Catalog(settings.catalog_url)
    with cat.session() as s:
        victim = s.scalar(sa.select(Slide).where(Slide.status == INDEXED).order_by(Slide.id))
        shard = s.scalar(
            sa.select(Shard).join(Tile, Tile.shard_id == Shard.id).where(Tile.slide_id == victim.id).limit(1)
        )
        shard_file = Path(settings.index_dir) / shard.path
        shard_bytes = shard_file.read_bytes()
    # Undo the commit of one slide, keep its shard file: the state after a kill between
    # the shard write and the catalog commit.
    from indexer.register import drop_slide_vectors

    with cat.session() as s:
        victim = s.get(Slide, victim.id)
        drop_slide_vectors(s, victim, Path(settings.index_dir))
        victim.status = "pending"
    shard_file.write_bytes(shard_bytes)
    (shard_file.parent / ".slide-000000099.faiss.123.tmp").write_bytes(b"half")
    # ... and the temp files engine.files.atomic_output leaves when killed mid-write.
    (shard_file.parent / ".slide-000000099.123.tmp.faiss").write_bytes(b"half")
    (shard_file.parent / ".slide-000000099.123.tmp.json").write_bytes(b"half")
    report = verify_index(cat, settings.index_dir)
    assert not report.ok and any("in no catalog row" in p for p in report.problems)

    rerun = _build(settings, archive)
    assert rerun.indexed == 1 and any("no catalog row references" in n for n in rerun.notes)
    assert not list(shard_file.parent.glob(".*.tmp"))
    assert not list(shard_file.parent.glob(".*.tmp.*"))
    got = _snapshot(settings)
    assert got["slides"] == want["slides"] and got["tiles"] == want["tiles"]
    assert all(np.allclose(got["vectors"][i], want["vectors"][i], atol=1e-5) for i in want["vectors"])
    assert verify_index(cat, settings.index_dir).ok
    cat.dispose()


def test_verify_finds_tampering_and_remove_drops_slides(tmp_path, archive):
    settings = _settings(tmp_path)
    _build(settings, archive)
    cat = Catalog(settings.catalog_url)
    shards = sorted((Path(settings.index_dir)).rglob("*.faiss"))
    # A shard whose content changed behind the catalog's back: checksum and orphan ids.
    ids, xb = shard_arrays(shards[0])
    from engine.shards import read_shard_encoder

    write_shard(shards[0], np.append(ids, ids.max() + 1), np.vstack([xb, xb[:1]]), read_shard_encoder(shards[0]))
    problems = verify_index(cat, settings.index_dir).problems
    assert any("sha256" in p for p in problems) and any("orphans" in p for p in problems)

    with pytest.raises(NotFound):
        remove_slides(cat, settings.index_dir, ["no-such-slide"])
    with cat.session() as s:
        first = s.scalar(sa.select(Slide).where(Slide.status == INDEXED).order_by(Slide.id))
        first_id, first_path = first.id, first.path
    assert remove_slides(cat, settings.index_dir, [str(first_id)]) == [first_path]
    assert not shards[0].exists()
    with cat.session() as s:
        assert s.get(Slide, first_id) is None
        assert s.scalar(sa.select(sa.func.count(Tile.id)).where(Tile.slide_id == first_id)) == 0
    assert verify_index(cat, settings.index_dir).ok
    cat.dispose()


def test_refusals(tmp_path, archive, monkeypatch):
    settings = _settings(tmp_path)
    with pytest.raises(ConfigError, match="PostgreSQL|server database"):
        build_archive(settings, archive, ctx=DistContext(rank=0, world_size=4, local_rank=0, local_world_size=2))
    _build(settings, archive)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,label\na.tiff,TUM\n")
    with pytest.raises(ValueError, match="no column naming the slide file"):
        _build(settings, archive, metadata=bad_csv)
    # a second encoder refused for its metadata, or stopped once its row is made (the
    # registration failing), leaves no encoder row behind (it used to: made in a transaction
    # of its own)
    with pytest.raises(ValueError, match="no column naming the slide file"):
        _build(_settings(tmp_path, encoder="random:resnet18:7"), archive, metadata=bad_csv)

    def refuse(*args, **kwargs):
        raise ConfigError("refused during registration")

    monkeypatch.setattr("indexer.prepare.register", refuse)
    with pytest.raises(ConfigError, match="refused during registration"):
        _build(_settings(tmp_path, encoder="random:resnet18:7"), archive)
    monkeypatch.undo()
    cat = Catalog(settings.catalog_url)
    with cat.session() as s:
        assert s.scalar(sa.select(sa.func.count(EncoderRecord.id))) == 1
    cat.dispose()
    with pytest.raises(ConfigError, match="minimum tissue fraction"):
        _build(settings, archive, min_tissue=2.0)


def test_cli_build_status_verify_remove(tmp_path, archive):
    common = [
        "--catalog",
        f"sqlite:///{tmp_path / 'cli.sqlite'}",
        "--index-dir",
        str(tmp_path / "cli-index"),
        "--encoder",
        ENCODER,
        "--device",
        "cpu",
    ]
    runner = CliRunner()
    result = runner.invoke(
        indexer_cli, ["build", str(archive), "--workers", "1", "--batch-size", "4", "--json", *common]
    )
    assert result.exit_code == 1, result.output  # two slides failed
    doc = json.loads(result.stdout)
    assert (doc["indexed"], doc["failed"]) == (3, 2) and doc["tiles_per_s"] > 0

    status = runner.invoke(indexer_cli, ["status", "--json", *common])
    assert status.exit_code == 0, status.output
    listed = json.loads(status.stdout)
    assert listed["counts"] == {"indexed": 3, "failed": 2, "pending": 0, "missing": 0, "tiles": doc["tiles"]}
    failed = {Path(r["path"]).name: r["error"] for r in listed["slides"] if r["status"] == "failed"}
    assert set(failed) == {"nompp.tiff", "garbage.svs"} and all(failed.values())
    on_disk = sum(len(shard_arrays(p)[0]) for p in sorted((tmp_path / "cli-index").rglob("*.faiss")))
    assert on_disk == doc["tiles"]

    verify = runner.invoke(indexer_cli, ["verify", *common])
    assert verify.exit_code == 0 and "agree" in verify.output
    removed = runner.invoke(indexer_cli, ["remove", str(archive / "b.tiff"), *common])
    assert removed.exit_code == 0 and "b.tiff" in removed.output
    unknown = runner.invoke(indexer_cli, ["remove", "nope", *common])
    assert unknown.exit_code == 1 and "no slide 'nope'" in unknown.output
    assert runner.invoke(indexer_cli, ["verify", *common]).exit_code == 0
    assert "--min-tissue" in runner.invoke(indexer_cli, ["build", "--help"]).output


def test_build_on_sqlite_and_postgres(tmp_path, archive, catalog_url):
    """The same build on each catalog backend: indexed, verified, and a rerun is a no-op."""
    settings = Settings.load(
        env={},
        data_dir=str(tmp_path / "data"),
        catalog_url=catalog_url,
        index_dir=str(tmp_path / "index"),
        encoder=ENCODER,
        device="cpu",
    )
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(archive / "sub" / "c.tif", one / "c.tif")
    first = _build(settings, one)
    assert (first.indexed, first.failed) == (1, 0)
    again = _build(settings, one)
    assert (again.indexed, again.skipped) == (0, 1)
    cat = Catalog(catalog_url)
    assert verify_index(cat, settings.index_dir).ok
    cat.dispose()


def test_preview_draws_the_tiles_build_would_embed(tmp_path, archive):
    from PIL import Image

    from indexer.pipeline import plan_slide

    out = tmp_path / "preview.png"
    result = CliRunner().invoke(indexer_cli, ["preview", str(archive / "a.tiff"), "--out", str(out), "--max-px", "700"])
    assert result.exit_code == 0, result.output
    plan = plan_slide(1, archive / "a.tiff", default_mpp=None, target_mpp=1.0, tile_px=224, min_tissue=0.5)
    assert result.output.startswith(f"{len(plan.boxes)} tiles of 224 px")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert max(img.shape[:2]) == 700
    green = (img[..., 1] == 200) & (img[..., 0] == 0) & (img[..., 2] == 0)
    assert green.sum() > 0
    nompp = CliRunner().invoke(indexer_cli, ["preview", str(archive / "nompp.tiff"), "--out", str(out)])
    assert nompp.exit_code == 1 and "default resolution" in nompp.output


def test_an_unforeseen_reader_error_fails_only_its_slide(tmp_path, archive, monkeypatch):
    import indexer.pipeline

    real = indexer.pipeline.slide_tissue_mask

    def breaks_on_b(slide):
        if slide.dimensions == (900, 900):  # b.tiff
            raise RuntimeError("decoder exploded")
        return real(slide)

    monkeypatch.setattr(indexer.pipeline, "slide_tissue_mask", breaks_on_b)
    summary = _build(_settings(tmp_path), archive)
    assert summary.indexed == 2
    failures = dict((Path(p).name, e) for p, e in summary.failures)
    assert "RuntimeError: decoder exploded" in failures["b.tiff"]
