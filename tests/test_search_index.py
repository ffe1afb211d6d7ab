"""The search engine over a larger synthetic catalog (vectors written straight into shard
files, as `indexer build` lays them out: one shard per slide): the compressed index gives the
flat index's answers, filters still fill top_k, and slides added or removed after start-up
are picked up by `refresh()` without retraining."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import INDEXED, EncoderRecord, Shard, Slide, Tile
from engine.config import Settings
from engine.encoder import Encoder
from engine.index import CompressedIndex
from engine.index.synthetic import ClusteredVectors
from engine.search import SearchEngine
from engine.shards import ShardEncoder, encoder_dir, write_shard

TILES_PER_SLIDE = 1500
N_SLIDES = 8  # 12,000 tiles: enough to train the compressed index


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def encoder():
    return Encoder.from_spec("random:resnet18", device="cpu")


def add_slide(
    catalog: Catalog, settings: Settings, shard_enc: ShardEncoder, encoder_id: int, gen: ClusteredVectors, n: int
) -> int:
    """Slide n of the generator as catalog rows + its shard file; returns the slide id."""
    ids, xb = gen.chunk(n * TILES_PER_SLIDE, (n + 1) * TILES_PER_SLIDE)
    label = f"class-{int(gen.class_of_slide(np.array([n]))[0])}"
    path = encoder_dir(settings.index_dir, shard_enc) / f"slide-{n:09d}.faiss"
    sha = write_shard(path, ids + 1, xb, shard_enc)
    with catalog.session() as s:
        slide = Slide(
            path=f"/archive/s{n}.svs",
            fingerprint=f"fp{n}",
            patient=f"P{n}",
            label=label,
            site="synthetic",
            status=INDEXED,
            tile_count=len(ids),
            encoder_id=encoder_id,
            mpp=0.5,
        )
        s.add(slide)
        s.flush()
        shard = Shard(
            encoder_id=encoder_id, path=path.relative_to(settings.index_dir).as_posix(), count=len(ids), sha256=sha
        )
        s.add(shard)
        s.flush()
        side = 40
        s.execute(
            sa.insert(Tile),
            [
                {
                    "id": int(i) + 1,
                    "slide_id": slide.id,
                    "shard_id": shard.id,
                    "x": int(j % side) * 448,
                    "y": int(j // side) * 448,
                    "size": 448,
                    "tissue_fraction": 1.0,
                }
                for j, i in enumerate(ids)
            ],
        )
        return slide.id


def fill_archive(settings: Settings, encoder, n_slides: int):
    """A catalog at settings.catalog_url with the encoder's row and n_slides synthetic slides
    (shard files + rows): (catalog, slide ids, (shard encoder, encoder id, vector generator))."""
    catalog = Catalog(settings.catalog_url)
    info = encoder.info
    with catalog.session() as s:
        row = EncoderRecord(
            name=info.name,
            architecture=info.architecture,
            checkpoint_sha256=info.checkpoint_sha256,
            dim=info.dim,
            target_mpp=1.0,
            tile_px=224,
            normalisation=info.normalisation,
            is_random=True,
        )
        s.add(row)
        s.flush()
        encoder_id = row.id
    shard_enc = ShardEncoder(info.name, info.checkpoint_sha256, info.dim, 1.0, 224)
    gen = ClusteredVectors(dim=info.dim, tiles_per_slide=TILES_PER_SLIDE, n_classes=3, n_patterns=8, seed=11)
    slide_ids = [add_slide(catalog, settings, shard_enc, encoder_id, gen, n) for n in range(n_slides)]
    return catalog, slide_ids, (shard_enc, encoder_id, gen)


@pytest.fixture(scope="module")
def synthetic_archive(tmp_path_factory, encoder):
    tmp = tmp_path_factory.mktemp("synthetic")
    settings = Settings.load(
        env={},
        catalog_url=f"sqlite:///{tmp / 'catalog.sqlite'}",
        index_dir=str(tmp / "index"),
        encoder="random:resnet18",
        device="cpu",
    )
    catalog, slide_ids, (shard_enc, encoder_id, gen) = fill_archive(settings, encoder, N_SLIDES)
    # Train the compressed index here, small (training is the slow part on a busy CPU); the
    # engines below find it in its folder, fill it from the shards and keep it in step.
    _, sample = gen.chunk(0, N_SLIDES * TILES_PER_SLIDE)
    CompressedIndex.train(encoder_dir(settings.index_dir, shard_enc) / "compressed", sample, nlist=32, m=16)
    yield settings, catalog, slide_ids, (shard_enc, encoder_id, gen)
    catalog.dispose()


def test_compressed_engine_answers_like_flat(synthetic_archive, encoder):
    settings, catalog, slide_ids, _ = synthetic_archive
    flat = SearchEngine(settings, catalog=catalog, encoder=encoder, index_kind="flat")
    comp = SearchEngine(settings, catalog=catalog, encoder=encoder, index_kind="compressed")
    assert flat.index.kind == "flat" and comp.index.kind == "compressed"
    auto = SearchEngine(settings, catalog=catalog, encoder=encoder, flat_max=5000)
    assert auto.index.kind == "compressed"  # chosen by size; reopened from disk, not retrained
    for sid in slide_ids[:4]:
        a = [h.slide["id"] for h in flat.search_slide(sid, top_k=4).results]
        b = [h.slide["id"] for h in comp.search_slide(sid, top_k=4).results]
        assert a[0] == b[0] and len(set(a) & set(b)) >= 3, (a, b)
        assert sid not in b
    # filters fill top_k whenever enough slides match
    label = flat.search_slide(slide_ids[0], top_k=1).results[0].slide["label"]
    with catalog.session() as s:
        matching = s.scalar(sa.select(sa.func.count(Slide.id)).where(Slide.label == label, Slide.id != slide_ids[0]))
    res = comp.search_slide(slide_ids[0], top_k=10, filters={"label": label})
    assert len(res.results) == matching and {h.slide["label"] for h in res.results} == {label}


def test_refresh_adds_and_removes_without_retraining(synthetic_archive, encoder):
    settings, catalog, slide_ids, (shard_enc, encoder_id, gen) = synthetic_archive
    engine = SearchEngine(settings, catalog=catalog, encoder=encoder, index_kind="compressed")
    index_file = engine.index.folder / "ivfpq.faiss"
    trained_n = engine.index.manifest["trained_n"]
    before = engine.index.ntotal
    new_id = add_slide(catalog, settings, shard_enc, encoder_id, gen, N_SLIDES)
    engine.refresh()
    assert engine.index.ntotal == before + TILES_PER_SLIDE
    assert engine.index.manifest["trained_n"] == trained_n and index_file.exists()
    res = engine.search_slide(new_id, top_k=1, exclude_self=False)
    assert res.results[0].slide["id"] == new_id and res.results[0].score > 0.99
    # remove it again as `indexer remove` does: rows, then the shard file
    with catalog.session() as s:
        shard = s.scalar(sa.select(Shard).join(Tile, Tile.shard_id == Shard.id).where(Tile.slide_id == new_id).limit(1))
        path = settings.index_dir / shard.path
        s.execute(sa.delete(Tile).where(Tile.slide_id == new_id))
        s.delete(shard)
        s.delete(s.get(Slide, new_id))
    path.unlink()
    engine.refresh()
    assert engine.index.ntotal == before
    hits = engine.search_slide(slide_ids[0], top_k=N_SLIDES).results
    assert new_id not in [h.slide["id"] for h in hits] and len(hits) == N_SLIDES - 1


@pytest.mark.postgres
def test_search_and_refresh_on_postgres(tmp_path, encoder):
    """The engine's SQL (filters, tile lookups, refresh) on a PostgreSQL catalog."""
    from tests.conftest import _reset_postgres, postgres_url

    url = postgres_url()
    _reset_postgres(url)
    settings = Settings.load(
        env={}, catalog_url=url, index_dir=str(tmp_path / "index"), encoder="random:resnet18", device="cpu"
    )
    catalog, ids, _ = fill_archive(settings, encoder, 3)
    try:
        engine = SearchEngine(settings, catalog=catalog, encoder=encoder)
        assert engine.index.kind == "flat"
        res = engine.search_slide(ids[0], top_k=5, filters={"site": "synthetic"})
        assert sorted(h.slide["id"] for h in res.results) == sorted(ids[1:])
        with catalog.session() as s:
            s.execute(sa.delete(Tile).where(Tile.slide_id == ids[2]))
            s.execute(sa.delete(Shard).where(Shard.path.like("%slide-000000002.faiss")))
            s.delete(s.get(Slide, ids[2]))
        engine.refresh()
        assert [h.slide["id"] for h in engine.search_slide(ids[0], top_k=5).results] == [ids[1]]
    finally:
        catalog.dispose()
