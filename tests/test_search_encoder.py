"""The index knows its encoder (issue 13.1): `indexer build` records in the catalog what loads
its encoder again (encoders.spec), and search (CLI, API, web app: all through SearchEngine)
uses it when no encoder is given; a checkpoint that is gone or changed is a clear error naming
the path and both hashes; an older catalog is upgraded with its rows kept."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from alembic import command
from click.testing import CliRunner
from PIL import Image

from engine.catalog.db import Catalog, alembic_config
from engine.catalog.models import EncoderRecord, Shard
from engine.cli.main import main
from engine.config import Settings
from engine.errors import EncoderError
from engine.files import file_sha256
from engine.search import SearchEngine
from engine.search.which_encoder import canonical_spec, index_encoder_spec
from tests.checkpoints import save_released_layout, torchvision_resnet
from tests.indexed_archive import make_indexed_archive
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff


def no_encoder(settings: Settings, encoder: str | None = None) -> Settings:
    return Settings.load(
        env={},
        encoder=encoder,
        data_dir=str(settings.data_dir),
        catalog_url=settings.catalog_url,
        index_dir=str(settings.index_dir),
        device="cpu",
    )


def blob_slide(tmp_path, seed: int = 3):
    rgb = tissue_blobs(1200, 1200, seed=seed, n_blobs=3)
    return write_pyramidal_tiff(tmp_path / "src" / f"blobs-{seed}.tiff", rgb, mpp=0.5), rgb


def spec_of(settings: Settings) -> str | None:
    catalog = Catalog(settings.catalog_url)
    try:
        with catalog.session() as s:
            return s.scalar(sa.select(EncoderRecord.spec))
    finally:
        catalog.dispose()


def test_canonical_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert canonical_spec("random") == "random:resnet50:0"
    assert canonical_spec("random:resnet18") == "random:resnet18:0"
    assert canonical_spec("w/best.pth") == str(tmp_path / "w" / "best.pth")
    assert canonical_spec("card.json") == str(tmp_path / "card.json")
    assert canonical_spec("preset:uni:w.bin") == f"preset:uni:{tmp_path / 'w.bin'}"


def test_search_without_encoder_uses_the_index_encoder(tmp_path, monkeypatch):
    monkeypatch.delenv("HISTOSEEK_ENCODER", raising=False)
    path, rgb = blob_slide(tmp_path)
    settings = make_indexed_archive(tmp_path / "archive", [path], encoder="random:resnet18")
    assert spec_of(settings) == "random:resnet18:0"
    crop = tmp_path / "crop.png"
    ys, xs = (rgb[..., 0] < 230).nonzero()
    cy, cx = int(ys.mean()), int(xs.mean())
    Image.fromarray(rgb[cy - 250 : cy + 250, cx - 250 : cx + 250]).save(crop)
    args = ["search", "--catalog", settings.catalog_url, "--index-dir", str(settings.index_dir)]
    args += ["--data-dir", str(settings.data_dir), "--device", "cpu", "--image", str(crop), "--mpp", "0.5", "--json"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["results"][0]["slide"]["path"].endswith(path.name)
    # a given encoder still overrides, and one that is not the index's is refused
    with pytest.raises(EncoderError, match="not the one the index was built with"):
        SearchEngine(no_encoder(settings, "random:resnet18:1"))


def test_a_changed_or_missing_checkpoint_names_the_path_and_both_hashes(tmp_path):
    ckpt = save_released_layout(torchvision_resnet("resnet18", seed=1), tmp_path / "best_ckpt.pth")
    built = file_sha256(ckpt)
    path, _ = blob_slide(tmp_path)
    settings = make_indexed_archive(tmp_path / "archive", [path], encoder=str(ckpt))
    assert spec_of(settings) == str(ckpt.resolve())
    engine = SearchEngine(no_encoder(settings))  # loads the checkpoint the catalog names
    assert engine.encoder.info.checkpoint_sha256 == built
    engine.catalog.dispose()
    save_released_layout(torchvision_resnet("resnet18", seed=2), ckpt)  # overwritten
    now = file_sha256(ckpt)
    with pytest.raises(EncoderError) as err:
        SearchEngine(no_encoder(settings))
    assert str(ckpt.resolve()) in str(err.value) and built in str(err.value) and now in str(err.value)
    ckpt.unlink()
    with pytest.raises(EncoderError, match="gone") as err:
        SearchEngine(no_encoder(settings))
    assert str(ckpt.resolve()) in str(err.value) and built in str(err.value)


def test_several_encoders_ask_to_choose(tmp_path):
    path, _ = blob_slide(tmp_path)
    settings = make_indexed_archive(tmp_path / "archive", [path], encoder="random:resnet18")
    catalog = Catalog(settings.catalog_url)
    try:
        with catalog.session() as s:
            first = s.scalar(sa.select(EncoderRecord))
            other = EncoderRecord(
                name="other",
                architecture="resnet18",
                checkpoint_sha256="b" * 64,
                dim=512,
                target_mpp=first.target_mpp,
                tile_px=first.tile_px,
                normalisation={},
                spec="random:resnet18:7",
            )
            s.add(other)
            s.flush()
            s.add(Shard(encoder_id=other.id, path="other/shard.npy", count=0, sha256="c" * 64))
        with pytest.raises(EncoderError, match="2 encoders.*random:resnet18:0.*random:resnet18:7.*--encoder"):
            index_encoder_spec(catalog)
    finally:
        catalog.dispose()


def test_upgrade_from_0002_keeps_encoders_without_a_spec(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    command.upgrade(alembic_config(url), "0002")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO encoders VALUES (1,'r','resnet18','" + "a" * 64 + "',512,1.0,224,'{}',0,'2026-01-01')"
        )
        conn.exec_driver_sql(
            "INSERT INTO shards (id,encoder_id,path,count,sha256,status,created_at,updated_at) "
            "VALUES (1,1,'s.npy',0,'" + "d" * 64 + "','ok','2026-01-01','2026-01-01')"
        )
    engine.dispose()
    catalog = Catalog(url)  # upgrades to head
    try:
        with catalog.session() as s:
            row = s.get(EncoderRecord, 1)
            assert row.name == "r" and row.spec is None
        with pytest.raises(EncoderError, match="built before encoder specs were kept.*--encoder"):
            index_encoder_spec(catalog)
        command.check(alembic_config(url))  # models and migrations agree
    finally:
        catalog.dispose()
