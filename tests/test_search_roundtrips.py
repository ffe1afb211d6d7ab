"""How often a search goes to the catalog once the index has answered (issue 12).

What is counted: the SQL statements the catalog's SQLAlchemy engine sends to the database
(its "before_cursor_execute" event, one per round trip), from the moment the FAISS search
returns (SearchEngine.live.search, wrapped here) to the end of search_region/search_slide.
Statements before it (the filters and exclusions, a slide query's mosaic) are not counted.
The bound: two, one for the neighbour tiles (their slides and boxes) and one for the result
slides (their descriptions, mpp, and for a region query every tile the region is placed
on), however many tiles and result slides there are."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import Slide, Tile
from engine.search import SearchEngine
from engine.search.lookups import result_slides, tile_rows
from engine.slides import open_slide
from tests.indexed_archive import make_indexed_archive
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff

SLIDES = [("one.tiff", 41, "A"), ("two.tiff", 42, "B"), ("three.tiff", 43, "A"), ("four.tiff", 44, "B")]


class StatementLog:
    """The SQL statements a catalog sends, and how many had been sent when each index
    search returned."""

    def __init__(self, engine: SearchEngine):
        self.statements: list[str] = []
        self.at_search: list[int] = []
        self._engine = engine
        self._search = engine.live.search

    def _on_execute(self, conn, cursor, statement, parameters, context, executemany):
        self.statements.append(statement)

    def _searched(self, *args, **kwargs):
        out = self._search(*args, **kwargs)
        self.at_search.append(len(self.statements))
        return out

    def __enter__(self):
        sa.event.listen(self._engine.catalog.engine, "before_cursor_execute", self._on_execute)
        self._engine.live.search = self._searched
        return self

    def __exit__(self, *exc):
        sa.event.remove(self._engine.catalog.engine, "before_cursor_execute", self._on_execute)
        del self._engine.live.search  # the instance attribute; the method shows again

    def after_last_search(self) -> list[str]:
        return self.statements[self.at_search[-1] :]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("roundtrips")
    files = [
        write_pyramidal_tiff(tmp / "src" / name, tissue_blobs(1800, 1800, seed=seed, n_blobs=4), mpp=0.5)
        for name, seed, _ in SLIDES
    ]
    rows = [{"slide": name, "label": label, "site": "synthetic", "patient": name} for name, _, label in SLIDES]
    settings = make_indexed_archive(tmp / "archive", files, metadata_rows=rows)
    engine = SearchEngine(settings)
    with engine.catalog.session() as s:
        ids = {sl.path.rsplit("/", 1)[-1]: sl.id for sl in s.scalars(sa.select(Slide))}
    yield engine, ids
    engine.catalog.dispose()


def region_of(engine: SearchEngine, slide_id: int, tiles: int = 2):
    """A `tiles` x `tiles` tile region of the slide (level-0 pixels), from its most tissue-rich tile."""
    with engine.catalog.session() as s:
        sl = s.get(Slide, slide_id)
        tile = s.scalars(
            sa.select(Tile).where(Tile.slide_id == slide_id).order_by(Tile.tissue_fraction.desc(), Tile.id)
        ).first()
        path, x, y, size = sl.path, tile.x, tile.y, tile.size
    slide = open_slide(path)
    try:
        x, y = min(x, slide.dimensions[0] - tiles * size), min(y, slide.dimensions[1] - tiles * size)
        return slide.read_region((max(0, x), max(0, y)), 0, (tiles * size, tiles * size)).convert("RGB")
    finally:
        slide.close()


@pytest.mark.parametrize(
    "top_k, query", [(2, {}), (4, {"filters": {"label": "A"}}), (3, {"exclude_patient": "two.tiff"})]
)
def test_region_query_reads_the_catalog_twice_after_the_index(archive, top_k, query):
    engine, ids = archive
    image = region_of(engine, ids["one.tiff"])
    with StatementLog(engine) as log:
        result = engine.search_region(image, mpp=0.5, top_k=top_k, **query)
    assert result.query["tiles"] > 1  # the region is placed on the result slides' tiles
    assert result.results and all(h.regions for h in result.results)
    after = log.after_last_search()
    assert len(after) <= 2, after
    assert len(log.statements) <= 2 + bool(query), log.statements  # a filter or exclusion: one statement before
    # the usual case: the first k reaches top_k slides, so there was one index search
    assert len(log.at_search) == 1
    assert all(len(h.regions) >= 1 for h in result.results)


def test_slide_query_reads_the_catalog_twice_after_the_index(archive):
    engine, ids = archive
    with StatementLog(engine) as log:
        result = engine.search_slide(ids["three.tiff"], top_k=3)
    assert len(result.results) == 3 and ids["three.tiff"] not in [h.slide["id"] for h in result.results]
    assert len(log.at_search) == 1 and len(log.after_last_search()) <= 2, log.after_last_search()


def test_tile_lookup_is_one_statement_for_any_number_of_ids(archive):
    """50,000 ids, more than SQLite binds in one statement: still one statement, and the
    answer is exactly the tiles that exist."""
    engine, _ = archive
    with engine.catalog.session() as s:
        real = {r[0]: tuple(r[1:]) for r in s.execute(sa.select(Tile.id, Tile.slide_id, Tile.x, Tile.y, Tile.size))}
    ids = np.concatenate([np.fromiter(real, np.int64), np.arange(10**9, 10**9 + 50_000)])
    with StatementLog(engine) as log:
        found = tile_rows(engine.catalog, ids)
    assert found == real and len(log.statements) == 1


def test_lookups_on_each_database(catalog_url):
    """The one-parameter id lists are valid SQL on SQLite and PostgreSQL (an empty catalog)."""
    catalog = Catalog(catalog_url)
    try:
        assert tile_rows(catalog, np.arange(1, 40_000)) == {}
        assert result_slides(catalog, [1, 2, 3], with_tiles=True, encoder_id=1) == {}
    finally:
        catalog.dispose()
