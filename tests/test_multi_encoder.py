"""Several encoders over one archive (issue 15.3): one archive of real slides indexed with a
random ResNet-18 and with a random-init ViT-S card, side by side in one catalog and index
folder; each searchable with its own vectors, per-encoder status, resumable per encoder, a
changed file dropping the vectors of every encoder, and a catalog of revision 0003 upgraded
in place with its tile ids (the FAISS ids in its shards) kept."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from click.testing import CliRunner

from engine.catalog.db import Catalog
from engine.catalog.models import INDEXED, MISSING, PENDING, EncoderRecord, Shard, Slide, SlideEncoding, Tile
from engine.errors import EncoderError, QueryError
from engine.files import file_sha256
from engine.search import SearchEngine
from engine.shards import shard_arrays
from indexer.build import build_archive
from indexer.cli import main as indexer_cli
from indexer.remove import remove_slides
from indexer.verify import verify_index
from indexer.writer import TILE_ID_STRIDE
from tests.checkpoints import vit_model, write_card
from tests.indexed_archive import archive_settings, link_into
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff

timm = pytest.importorskip("timm")

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "real"
SLIDES = [REAL / "CMU-1-Small-Region.svs", REAL / "tcga-cr-7395-01a-01-ts1.svs"]
RESNET = "random:resnet18"
RESNET_NAME = "random:resnet18:0"
VIT_NAME = "vit-s-random"


def vit_card(folder: Path) -> Path:
    """A random-init ViT-S/16 card at 2 um/px (its own grid, unlike the ResNet's 1 um/px)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(vit_model(seed=3).state_dict(), folder / "weights.pth")
    return write_card(folder, name=VIT_NAME, mpp=2.0)


def _blobs(seed: int):
    return tissue_blobs(2400, 2400, seed=seed, n_blobs=4, radius=(0.3, 0.45))


def build(settings, archive):
    return build_archive(settings, archive, workers=0, batch_size=16, progress=False, default_mpp=0.5)


def shard_state(settings, encoder_name: str) -> dict[str, str]:
    """Shard path -> sha256 of the encoder's shard files, read from the disk."""
    cat = Catalog(settings.catalog_url)
    with cat.session() as s:
        rows = s.execute(
            sa.select(Shard.path)
            .join(EncoderRecord, EncoderRecord.id == Shard.encoder_id)
            .where(EncoderRecord.name == encoder_name)
        ).all()
    cat.dispose()
    return {p: file_sha256(Path(settings.index_dir) / p) for (p,) in rows}


@pytest.fixture(scope="module")
def two_encoders(tmp_path_factory):
    if not all(p.is_file() for p in SLIDES):
        pytest.skip("needs ../shared/data/slides/real")
    tmp = tmp_path_factory.mktemp("multi")
    archive = tmp / "archive"
    link_into(archive, SLIDES)
    # big enough for tiles at the ViT's 2 um/px: 1200 um square
    write_pyramidal_tiff(archive / "synthetic.tiff", _blobs(5), mpp=0.5)
    card = vit_card(tmp / "vit")
    resnet = archive_settings(tmp, RESNET)
    first = build(resnet, archive)
    assert (first.indexed, first.failed) == (3, 0), first.failures
    before = shard_state(resnet, RESNET_NAME)
    vit = archive_settings(tmp, str(card))
    second = build(vit, archive)
    return {
        "tmp": tmp,
        "archive": archive,
        "resnet": resnet,
        "vit": vit,
        "card": card,
        "first": first,
        "second": second,
        "resnet_shards_before": before,
    }


def test_second_encoder_embeds_every_slide_beside_the_first(two_encoders):
    t = two_encoders
    assert (t["second"].indexed, t["second"].skipped, t["second"].failed) == (3, 0, 0), t["second"].failures
    # the ResNet's shard files are untouched by the ViT build
    assert shard_state(t["resnet"], RESNET_NAME) == t["resnet_shards_before"]
    cat = Catalog(t["resnet"].catalog_url)
    with cat.session() as s:
        encoders = {e.name: e for e in s.scalars(sa.select(EncoderRecord))}
        assert set(encoders) == {RESNET_NAME, VIT_NAME}
        assert (encoders[VIT_NAME].target_mpp, encoders[RESNET_NAME].target_mpp) == (2.0, 1.0)
        for slide in s.scalars(sa.select(Slide)):
            assert slide.status == INDEXED
            rows = {
                e.encoder_id: e for e in s.scalars(sa.select(SlideEncoding).where(SlideEncoding.slide_id == slide.id))
            }
            assert set(rows) == {e.id for e in encoders.values()} and all(r.status == INDEXED for r in rows.values())
            for enc in rows.values():
                tiles = s.scalars(sa.select(Tile.id).where(Tile.encoding_id == enc.id).order_by(Tile.id)).all()
                assert len(tiles) == enc.tile_count > 0
                assert tiles == [enc.id * TILE_ID_STRIDE + i for i in range(len(tiles))]
        # the ViT's shards live in their own folder and hold the ViT's 384-d vectors
        vit_shards = s.scalars(sa.select(Shard).where(Shard.encoder_id == encoders[VIT_NAME].id)).all()
        resnet_dirs = {
            Path(sh.path).parent
            for sh in s.scalars(sa.select(Shard).where(Shard.encoder_id == encoders[RESNET_NAME].id))
        }
        assert vit_shards and {Path(sh.path).parent for sh in vit_shards}.isdisjoint(resnet_dirs)
        _, x = shard_arrays(Path(t["vit"].index_dir) / vit_shards[0].path)
        assert x.shape[1] == 384
    assert verify_index(cat, t["resnet"].index_dir).ok
    cat.dispose()
    # resumable per encoder: a second run of either embeds nothing
    again = build(t["vit"], t["archive"])
    assert (again.indexed, again.skipped) == (0, 3)


def test_status_json_shows_each_encoders_progress(two_encoders):
    t = two_encoders
    settings = t["resnet"]
    args = ["status", "--json", "--catalog", settings.catalog_url, "--index-dir", str(settings.index_dir)]
    result = CliRunner().invoke(indexer_cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    by_name = {e["name"]: e for e in doc["encoders"]}
    assert set(by_name) == {RESNET_NAME, VIT_NAME}
    for name, mpp in ((RESNET_NAME, 1.0), (VIT_NAME, 2.0)):
        progress = by_name[name]["progress"]
        assert (progress["indexed"], progress["pending"], progress["failed"], progress["missing"]) == (3, 0, 0, 0)
        assert progress["tiles"] > 0 and by_name[name]["target_mpp"] == mpp
    # the ViT at 2 um/px cuts fewer tiles than the ResNet at 1 um/px
    assert by_name[VIT_NAME]["progress"]["tiles"] < by_name[RESNET_NAME]["progress"]["tiles"]
    assert all({e["encoder"] for e in row["encodings"]} == {RESNET_NAME, VIT_NAME} for row in doc["slides"])
    text = CliRunner().invoke(indexer_cli, args[:1] + args[2:])
    assert f"encoder {VIT_NAME}: 2 um/px, 224 px tiles (encoder); 3 indexed, 0 pending" in text.output


def test_each_encoder_searches_its_own_vectors(two_encoders):
    t = two_encoders
    settings = t["resnet"]  # its HISTOSEEK_ENCODER-like setting is a spec; search also takes names
    cat = Catalog(settings.catalog_url)
    try:
        with pytest.raises(EncoderError, match=f"2 encoders.*{RESNET_NAME}.*{VIT_NAME}.*--encoder"):
            SearchEngine(archive_settings(t["tmp"], None), catalog=cat)
        with pytest.raises(EncoderError, match="no encoder 'nope'.*vit-s-random"):
            SearchEngine(settings, catalog=cat, encoder_name="nope")
        with cat.session() as s:
            cmu = s.scalar(sa.select(Slide.id).where(Slide.path.endswith("CMU-1-Small-Region.svs")))
            tiles = {
                e.name: e_tiles
                for e, e_tiles in s.execute(
                    sa.select(EncoderRecord, sa.func.sum(SlideEncoding.tile_count))
                    .join(SlideEncoding, SlideEncoding.encoder_id == EncoderRecord.id)
                    .group_by(EncoderRecord.id)
                )
            }
        image = _crop(SLIDES[0])
        for name, dim in ((RESNET_NAME, 512), (VIT_NAME, 384)):
            engine = SearchEngine(settings, catalog=cat, encoder_name=name)
            assert engine.encoder.dim == dim and engine.index.ntotal == tiles[name]
            region = engine.search_region(image, mpp=0.499, top_k=3)
            assert region.query["encoder"]["name"] == name
            assert region.results[0].slide["id"] == cmu
            slide = engine.search_slide(cmu, top_k=3, exclude_self=False)
            assert slide.query["encoder"]["name"] == name
            assert slide.results[0].slide["id"] == cmu and slide.results[0].score == pytest.approx(1.0, abs=1e-4)
        # the card named by its spec (as HISTOSEEK_ENCODER would) is the same encoder
        by_spec = SearchEngine(t["vit"], catalog=cat)
        assert by_spec.encoder_row["name"] == VIT_NAME
    finally:
        cat.dispose()


def _crop(path: Path):
    """A 900 px square of tissue from the middle of the slide, at its own 0.499 um/px."""
    from engine.slides import open_slide

    slide = open_slide(path)
    try:
        return slide.read_region((660, 1030), 0, (900, 900)).convert("RGB")
    finally:
        slide.close()


def test_changed_or_removed_slide_drops_every_encoders_vectors(two_encoders):
    t = two_encoders
    archive, resnet, vit = t["archive"], t["resnet"], t["vit"]
    cat = Catalog(resnet.catalog_url)
    with cat.session() as s:
        old = s.scalar(sa.select(Slide).where(Slide.path.endswith("synthetic.tiff")))
        old_id = old.id
        old_shards = [
            Path(resnet.index_dir) / p
            for (p,) in s.execute(
                sa.select(Shard.path).join(Tile, Tile.shard_id == Shard.id).where(Tile.slide_id == old_id).distinct()
            )
        ]
    assert len(old_shards) == 2
    (archive / "synthetic.tiff").unlink()
    write_pyramidal_tiff(archive / "synthetic.tiff", _blobs(6), mpp=0.5)
    summary = build(resnet, archive)  # the ResNet build notices the change
    assert summary.indexed == 1 and any("changed since it was indexed" in n for n in summary.notes)
    assert not any(p.exists() for p in old_shards)
    with cat.session() as s:
        assert s.get(Slide, old_id) is None
        new = s.scalar(sa.select(Slide).where(Slide.path.endswith("synthetic.tiff")))
        statuses = dict(
            s.execute(
                sa.select(EncoderRecord.name, SlideEncoding.status)
                .join(SlideEncoding, SlideEncoding.encoder_id == EncoderRecord.id)
                .where(SlideEncoding.slide_id == new.id)
            ).all()
        )
        assert statuses == {RESNET_NAME: INDEXED}  # the ViT has yet to index the new content
    from indexer.status import encoder_grids

    progress = {g["name"]: g["progress"] for g in encoder_grids(cat)}
    assert (progress[VIT_NAME]["indexed"], progress[VIT_NAME]["pending"]) == (2, 1)
    assert (progress[RESNET_NAME]["indexed"], progress[RESNET_NAME]["pending"]) == (3, 0)
    vit_engine = SearchEngine(resnet, catalog=cat, encoder_name=VIT_NAME)
    with pytest.raises(QueryError, match="not indexed with this encoder"):
        vit_engine.search_slide(new.id)
    assert build(vit, archive).indexed == 1
    # a slide file gone: missing for every encoder, out of both searches
    (archive / SLIDES[1].name).unlink()
    build(vit, archive)
    progress = {g["name"]: g["progress"] for g in encoder_grids(cat)}
    assert progress[VIT_NAME]["missing"] == progress[RESNET_NAME]["missing"] == 1
    for name in (RESNET_NAME, VIT_NAME):
        engine = SearchEngine(resnet, catalog=cat, encoder_name=name)
        assert any("missing" in w for w in engine.warnings)
    with cat.session() as s:
        gone = s.scalar(sa.select(Slide).where(Slide.status == MISSING))
        gone_id = gone.id
    remove_slides(cat, resnet.index_dir, [str(gone_id)])
    with cat.session() as s:
        assert s.scalar(sa.select(sa.func.count(SlideEncoding.id)).where(SlideEncoding.slide_id == gone_id)) == 0
        assert s.scalar(sa.select(sa.func.count(Tile.id)).where(Tile.slide_id == gone_id)) == 0
    assert verify_index(cat, resnet.index_dir).ok
    cat.dispose()


def test_upgrade_from_0003_keeps_the_index(tmp_path):
    """A one-encoder catalog written at revision 0003 (status on the slide row) upgrades to
    slide_encodings with its tile ids, and search answers from its shards as before."""
    from alembic import command

    from engine.catalog.db import alembic_config
    from engine.encoder import Encoder
    from engine.shards import ShardEncoder, write_shard
    from indexer.writer import shard_path_for

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    command.upgrade(alembic_config(url), "0003")
    encoder = Encoder.from_spec(RESNET, device="cpu")
    info = encoder.info
    shard_encoder = ShardEncoder(info.name, info.checkpoint_sha256, encoder.dim, 1.0, 224)
    rng = np.random.default_rng(0)
    engine = sa.create_engine(url)
    index_dir = tmp_path / "index"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO encoders (id,name,architecture,checkpoint_sha256,dim,target_mpp,tile_px,normalisation,is_random,created_at,spec) "
            f"VALUES (1,'{info.name}','resnet18','{info.checkpoint_sha256}',512,1.0,224,'{{}}',1,'2026-01-01','{RESNET_NAME}')"
        )
        vectors = {}
        for sid, status in ((3, "indexed"), (4, "missing"), (6, "indexed")):
            conn.exec_driver_sql(
                "INSERT INTO slides (id,path,fingerprint,extra,status,tile_count,encoder_id,created_at,updated_at,indexed_at,mpp) "
                f"VALUES ({sid},'/a/s{sid}.svs','{sid:064d}','{{}}','{status}',4,1,'2026-01-01','2026-01-01','2026-01-02',1.0)"
            )
            ids = np.arange(4, dtype=np.int64) + sid * TILE_ID_STRIDE
            x = rng.standard_normal((4, 512)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            vectors[sid] = x
            path = shard_path_for(index_dir, shard_encoder, sid)
            sha = write_shard(path, ids, x, shard_encoder)
            conn.exec_driver_sql(
                "INSERT INTO shards (id,encoder_id,path,count,sha256,status,created_at,updated_at) "
                f"VALUES ({sid},1,'{path.relative_to(index_dir).as_posix()}',4,'{sha}','ok','2026-01-01','2026-01-01')"
            )
            for i, tid in enumerate(ids):
                conn.exec_driver_sql(
                    f"INSERT INTO tiles (id,slide_id,shard_id,x,y,size,tissue_fraction) VALUES ({tid},{sid},{sid},{i * 448},0,448,1.0)"
                )
        conn.exec_driver_sql("DELETE FROM tiles WHERE slide_id = 6")
        conn.exec_driver_sql("DELETE FROM shards WHERE id = 6")
        conn.exec_driver_sql("DELETE FROM slides WHERE id = 6")  # the highest id, removed
    engine.dispose()
    cat = Catalog(url)  # upgrades to head
    try:
        command.check(alembic_config(url))
        with cat.session() as s:
            encodings = {e.slide_id: e for e in s.scalars(sa.select(SlideEncoding))}
            assert {sid: (e.id, e.status, e.tile_count) for sid, e in encodings.items()} == {
                3: (3, INDEXED, 4),
                4: (4, INDEXED, 4),  # vectors kept; the file's absence stays on the slide
            }
            assert s.get(Slide, 4).status == MISSING and s.get(Slide, 3).tile_count == 4
            assert {t.encoding_id for t in s.scalars(sa.select(Tile))} == {3, 4}
            # ids never reused: a new slide and a new encoding come after the removed slide 6
            new = Slide(path="/a/new.svs", fingerprint="n" * 64, status=PENDING)
            s.add(new)
            s.flush()
            enc = SlideEncoding(slide_id=new.id, encoder_id=1, status=PENDING)
            s.add(enc)
            s.flush()
            assert new.id == 7 and enc.id == 7
            s.rollback()
        settings = dataclasses.replace(archive_settings(tmp_path, None), catalog_url=url, index_dir=index_dir)
        search = SearchEngine(settings, catalog=cat, encoder=encoder)
        assert search.index.ntotal == 4  # slide 4 is missing: its shard stays out
        hit = search.live.search(vectors[3][:1], 1, None)
        assert int(hit[1][0, 0]) == 3 * TILE_ID_STRIDE
    finally:
        cat.dispose()


def test_web_app_offers_and_searches_each_encoder(two_encoders):
    """The search forms offer the archive's encoders; the API takes `encoder`, lists them at
    GET /api/v1/encoders, and without one (none configured) asks for one by name."""
    import re

    from webapp import create_app, users

    t = two_encoders
    settings = archive_settings(t["tmp"], None)  # no configured encoder: the user chooses
    app = create_app({"TESTING": True, "SETTINGS": settings, "INSTANCE_PATH": str(t["tmp"] / "instance")})
    catalog = app.extensions["histoseek"].catalog
    try:
        users.create_user(catalog, "path", "multi encoder pw")
        client = app.test_client()
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
        login = {"username": "path", "password": "multi encoder pw", "csrf_token": token}
        assert client.post("/login", data=login).status_code == 302
        page = client.get("/").text
        assert page.count('<select name="encoder">') == 2
        assert f'<option value="{VIT_NAME}"' in page and f'<option value="{RESNET_NAME}"' in page
        listed = client.get("/api/v1/encoders").json
        assert {e["name"] for e in listed["encoders"]} == {RESNET_NAME, VIT_NAME} and listed["default"] is None
        with catalog.session() as s:
            cmu = s.scalar(sa.select(Slide.id).where(Slide.path.endswith("CMU-1-Small-Region.svs")))
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/account").text).group(1)
        headers = {"X-CSRF-Token": csrf}
        unnamed = client.post("/api/v1/search/slide", json={"slide_id": cmu}, headers=headers)
        assert unnamed.status_code == 400 and RESNET_NAME in unnamed.json["message"]
        unknown = client.post("/api/v1/search/slide", json={"slide_id": cmu, "encoder": "nope"}, headers=headers)
        assert unknown.status_code == 400 and VIT_NAME in unknown.json["message"]
        for name in (VIT_NAME, RESNET_NAME):
            answer = client.post("/api/v1/search/slide", json={"slide_id": cmu, "encoder": name}, headers=headers)
            assert answer.status_code == 200, answer.json
            assert answer.json["query"]["encoder"]["name"] == name
        results = client.get("/search/slide", query_string={"slide_id": cmu, "encoder": VIT_NAME}).text
        assert f"Encoder: {VIT_NAME}" in results
    finally:
        catalog.dispose()
