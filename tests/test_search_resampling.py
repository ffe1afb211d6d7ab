"""One resampling (issue 13.5): a region read from an indexed slide at the slide's own mpp and
queried at that mpp embeds to the very vectors the index stores for those tiles, because query
tiles are cut and resized by the index's own rule (engine.search.query.cut_tiles, the box
then engine.images.resize_bilinear, as engine.slides.read_box_array reads index tiles)."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from engine.catalog.models import Tile
from engine.search import SearchEngine
from engine.search import query as Q
from engine.slides import open_slide
from tests.indexed_archive import make_indexed_archive

SLIDE = "CMU-1-Small-Region.svs"  # one level, 0.499 um/px


@pytest.fixture(scope="module")
def indexed(shared_data, tmp_path_factory):
    path = shared_data / "slides" / "real" / SLIDE
    settings = make_indexed_archive(tmp_path_factory.mktemp("resampling"), [path])
    engine = SearchEngine(settings)
    yield engine, path
    engine.catalog.dispose()


def block_of_tiles(engine, n: int = 2):
    """The level-0 corner, tile size and tile ids (row-major) of an n x n block of indexed tiles."""
    with engine.catalog.session() as s:
        rows = s.execute(sa.select(Tile.id, Tile.x, Tile.y, Tile.size)).all()
    at = {(r.x, r.y): r.id for r in rows}
    size = rows[0].size
    for x, y in sorted(at, key=lambda p: (p[1], p[0])):
        ids = [at.get((x + i * size, y + j * size)) for j in range(n) for i in range(n)]
        if all(t is not None for t in ids):
            return x, y, size, ids
    pytest.skip(f"no {n} x {n} block of indexed tiles")


@pytest.mark.parametrize("n", [1, 2])
def test_region_of_an_indexed_slide_embeds_to_its_stored_vectors(indexed, n):
    engine, path = indexed
    x, y, size, ids = block_of_tiles(engine, n)
    slide = open_slide(path)
    try:
        slide_mpp = float(slide.properties["openslide.mpp-x"])
        image = slide.read_region((x, y), 0, (n * size, n * size)).convert("RGB")
    finally:
        slide.close()
    tiles, corners = Q.region_tiles(image, slide_mpp, engine.index_mpp, engine.tile_px)
    assert len(tiles) == n * n
    xq = Q.embed(engine.encoder, tiles, engine.tile_px)
    # the region's grid is aligned with the index's: cell (i, j) is tile (x + i size, y + j size)
    order = [ids[(cy // engine.tile_px) * n + cx // engine.tile_px] for cx, cy in corners]
    stored = engine.live.vectors(np.array(order, np.int64))
    np.testing.assert_allclose(xq, stored, atol=1e-5, rtol=0)
