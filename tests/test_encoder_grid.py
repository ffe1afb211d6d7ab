"""The encoder sets the tiling (issue 15.2): an archive indexed with an encoder card is tiled at
the card's `mpp` and `input_px` unless --target-mpp/--tile-px override, and the catalog and
`indexer status --json` say which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from click.testing import CliRunner

from engine.catalog.db import Catalog
from engine.catalog.models import EncoderRecord, Tile
from engine.pyramid_tiff import write_pyramidal_tiff
from indexer.cli import main as indexer_cli
from indexer.status import encoder_grids
from tests.synthetic_slides import tissue_blobs

ARCH = "vit_tiny_patch16_224"


def vit_tiny_card(folder: Path, mpp: float = 0.5, input_px: int = 224, name: str = "vit-tiny-test") -> Path:
    """A card for a randomly initialised vit_tiny_patch16_224 (weights saved with torch.save)."""
    import timm

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.pth"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(timm.create_model(ARCH, pretrained=False, num_classes=0).state_dict(), weights)
    card = {
        "name": name,
        "library": "timm",
        "architecture": ARCH,
        "kwargs": {"num_classes": 0},
        "weights": weights.name,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "input_px": input_px,
        "mpp": mpp,
        "pooling": "model",
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> Path:
    return vit_tiny_card(tmp_path_factory.mktemp("card"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """One 450 x 450 um tissue slide at 0.5 um/px: 4 x 4 tiles of 112 um (the card's grid),
    2 x 2 of 224 um (RetCCL's)."""
    root = tmp_path_factory.mktemp("archive")
    write_pyramidal_tiff(
        root / "a.tiff", tissue_blobs(900, 900, seed=1, n_blobs=3, radius=(0.35, 0.5)), mpp=0.5, min_level_px=256
    )
    return root


def _common(tmp: Path, encoder: str) -> list[str]:
    return [
        "--catalog",
        f"sqlite:///{tmp / 'catalog.sqlite'}",
        "--index-dir",
        str(tmp / "index"),
        "--encoder",
        encoder,
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]


def _build_and_status(tmp: Path, archive: Path, encoder: str, *extra: str) -> tuple[dict, dict]:
    runner = CliRunner()
    common = _common(tmp, encoder)
    built = runner.invoke(
        indexer_cli, ["build", str(archive), "--workers", "0", "--batch-size", "8", "--json", *extra, *common]
    )
    assert built.exit_code == 0, built.output
    status = runner.invoke(indexer_cli, ["status", "--json", *common])
    assert status.exit_code == 0, status.output
    return json.loads(built.stdout), json.loads(status.stdout)


def _grid_rows(tmp: Path) -> tuple[list[dict], set[int]]:
    catalog = Catalog(f"sqlite:///{tmp / 'catalog.sqlite'}")
    try:
        with catalog.session() as s:
            sizes = set(s.scalars(sa.select(Tile.size).distinct()))
            rows = s.scalars(sa.select(EncoderRecord)).all()
            assert len(rows) == 1
        return encoder_grids(catalog), sizes
    finally:
        catalog.dispose()


def test_a_card_sets_the_grid(tmp_path, archive, card):
    built, status = _build_and_status(tmp_path, archive, str(card))
    assert built["indexed"] == 1 and built["tiles"] > 4
    grids, sizes = _grid_rows(tmp_path)
    assert (grids[0]["target_mpp"], grids[0]["tile_px"]) == (0.5, 224)
    assert grids[0]["grid_source"] == "encoder"
    assert grids[0]["grid_sources"] == {"target_mpp": "encoder", "tile_px": "encoder"}
    assert grids[0]["indexed_slides"] == 1
    assert sizes == {224}  # 224 px at 0.5 um/px on a 0.5 um/px slide: 224 level-0 px
    slide = status["slides"][0]
    assert slide["encoder"]["name"] == "vit-tiny-test"
    assert (slide["encoder"]["target_mpp"], slide["encoder"]["tile_px"]) == (0.5, 224)
    assert slide["encoder"]["grid_source"] == "encoder"


def test_target_mpp_overrides_the_card(tmp_path, archive, card):
    built, status = _build_and_status(tmp_path, archive, str(card), "--target-mpp", "1.0")
    assert built["indexed"] == 1
    grids, sizes = _grid_rows(tmp_path)
    assert (grids[0]["target_mpp"], grids[0]["tile_px"]) == (1.0, 224)
    assert grids[0]["grid_source"] == "override"
    assert grids[0]["grid_sources"] == {"target_mpp": "override", "tile_px": "encoder"}
    assert sizes == {448}
    assert status["slides"][0]["encoder"]["grid_source"] == "override"


def test_retccl_keeps_its_grid(tmp_path, archive):
    _build_and_status(tmp_path, archive, "random:resnet18")
    grids, sizes = _grid_rows(tmp_path)
    assert (grids[0]["target_mpp"], grids[0]["tile_px"], grids[0]["grid_source"]) == (1.0, 224, "encoder")
    assert sizes == {448}
