"""Search over a real index of the real slides in ../shared/data/slides/real plus synthetic
ones (indexer build, random ResNet-18 weights): perturbed crops find their source slide and
where in it they come from, slide queries find the slide's twin, filters and exclusions
hold, bad queries get clear errors, and the CLI prints tables and JSON."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image

from engine.catalog.models import Slide, Tile
from engine.cli.main import main
from engine.errors import EncoderError, QueryError
from engine.search import SearchEngine, place_on_features
from engine.slides import open_slide
from tests.indexed_archive import make_indexed_archive
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff

REAL = ["CMU-1-Small-Region.svs", "CMU-1-Small-Region.generic-pyramid.tiff", "tcga-cr-7395-01a-01-ts1.svs"]
# the two CMU files hold the same pixels (one re-encoded): one patient, and either one is
# "the source" of a crop from the other
META = {
    "CMU-1-Small-Region.svs": {"patient": "CMU-1", "site": "skin", "diagnosis": "normal", "label": "CMU"},
    "CMU-1-Small-Region.generic-pyramid.tiff": {
        "patient": "CMU-1",
        "site": "skin",
        "diagnosis": "normal",
        "label": "CMU",
    },
    "tcga-cr-7395-01a-01-ts1.svs": {
        "patient": "TCGA-CR-7395",
        "site": "head and neck",
        "diagnosis": "squamous cell carcinoma",
        "label": "TCGA",
    },
    "blobs-a.tiff": {"patient": "SYN-A", "site": "synthetic", "diagnosis": "none", "label": "SYN"},
    "blobs-b.tiff": {"patient": "SYN-B", "site": "synthetic", "diagnosis": "none", "label": "SYN"},
}


@pytest.fixture(scope="module")
def archive(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    files = [shared_data / "slides" / "real" / name for name in REAL]
    files += [
        write_pyramidal_tiff(tmp / "src" / f"blobs-{c}.tiff", tissue_blobs(1800, 1800, seed=s, n_blobs=4), mpp=0.5)
        for c, s in (("a", 31), ("b", 32))
    ]
    rows = [{"slide": name, **meta} for name, meta in META.items()]
    # the TCGA frozen section has no resolution metadata; it was scanned at 20x
    settings = make_indexed_archive(tmp / "archive", files, metadata_rows=rows, default_mpp=0.5)
    engine = SearchEngine(settings)
    ids = {}
    with engine.catalog.session() as s:
        for sl in s.scalars(sa.select(Slide)):
            ids[sl.path.rsplit("/", 1)[-1]] = sl.id
    yield settings, engine, ids, tmp
    engine.catalog.dispose()


def perturb(crop: Image.Image, scale: float, turn: int) -> Image.Image:
    """Rotate by 90 degrees (`turn` times), mirror, rescale, and pass through JPEG q70."""
    for _ in range(turn):
        crop = crop.transpose(Image.Transpose.ROTATE_90)
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=70)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def overlaps(region: dict, x0: int, y0: int, size: int) -> bool:
    return (
        region["x"] < x0 + size
        and region["x"] + region["w"] > x0
        and region["y"] < y0 + size
        and region["y"] + region["h"] > y0
    )


@pytest.fixture(scope="module")
def perturbed_crops(archive):
    """The must-show queries: crops of two tiles by two from indexed real slides, off the
    tile grid, rotated by 90/180/270 degrees, mirrored, rescaled by 0.9 or 1.1 and
    JPEG q70-compressed, each searched; one record per crop."""
    settings, engine, ids, tmp = archive
    rng = np.random.default_rng(7)
    report = []
    for name in ("tcga-cr-7395-01a-01-ts1.svs", "CMU-1-Small-Region.svs"):
        with engine.catalog.session() as s:
            tiles = s.execute(
                sa.select(Tile.x, Tile.y, Tile.size)
                .where(Tile.slide_id == ids[name], Tile.tissue_fraction >= 0.9)
                .order_by(Tile.id)
            ).all()
        slide = open_slide(tmp / "archive" / "archive" / name)
        mpp = 0.5 if name.startswith("tcga") else float(slide.properties["openslide.mpp-x"])
        for trial in range(3):
            x, y, size = tiles[int(rng.integers(len(tiles)))]
            crop_size = 2 * size
            x0 = max(0, x - size // 2 + int(rng.integers(-size // 4, size // 4)))
            y0 = max(0, y - size // 2 + int(rng.integers(-size // 4, size // 4)))
            crop = slide.read_region((x0, y0), 0, (crop_size, crop_size)).convert("RGB")
            scale = (0.9, 1.1)[trial % 2]
            result = engine.search_region(perturb(crop, scale, turn=1 + trial), mpp=mpp / scale, top_k=3).to_json()
            top = result["results"][0]
            report.append(
                {
                    "slide": name,
                    "crop": [x0, y0, crop_size],
                    "scale": scale,
                    "turns": 1 + trial,
                    "rank1": top["slide"]["path"].rsplit("/", 1)[-1],
                    "score": top["score"],
                    "second": result["results"][1]["score"],
                    "best_region": top["regions"][0],
                    "located": overlaps(top["regions"][0], x0, y0, crop_size),
                    "any_region_located": any(overlaps(r, x0, y0, crop_size) for r in top["regions"]),
                }
            )
        slide.close()
    return report


def test_perturbed_crops_find_their_source_slide(perturbed_crops, test_output):
    (test_output / "perturbed_crops.json").write_text(json.dumps(perturbed_crops, indent=1))
    for rec in perturbed_crops:
        # either CMU file is the source of a CMU crop: they hold the same pixels
        same_patient = {n for n in META if META[n]["patient"] == META[rec["slide"]]["patient"]}
        assert rec["rank1"] in same_patient, rec


def test_perturbed_crops_are_located(perturbed_crops):
    """The best box of the source slide is where the crop came from: features alone (random
    weights) cannot place it inside the uniform TCGA frozen section, so the box is pinned
    from the crop's pixels (engine.search.localise), and says so."""
    for rec in perturbed_crops:
        assert rec["located"] and rec["best_region"]["match"] == "pixels", rec
        x0, y0, size = rec["crop"]
        box = rec["best_region"]
        # the crop's own box, to within a few level-0 pixels (a rotation by 90 keeps a square)
        assert max(abs(box["x"] - x0), abs(box["y"] - y0), abs(box["w"] - size), abs(box["h"] - size)) <= 8, rec


def test_unperturbed_crop_is_located_exactly(archive):
    """The placement machinery on a real slide: a grid-aligned 2 x 2-tile crop at the
    slide's own resolution comes back as exactly its four tiles (features), after the
    crop's own box (pixels)."""
    settings, engine, ids, tmp = archive
    name = "tcga-cr-7395-01a-01-ts1.svs"
    with engine.catalog.session() as s:
        boxes = {(t.x, t.y): t.size for t in s.scalars(sa.select(Tile).where(Tile.slide_id == ids[name]))}
    size = next(iter(boxes.values()))
    x, y = next(
        (x, y) for (x, y) in sorted(boxes) if all((x + dx, y + dy) in boxes for dx in (0, size) for dy in (0, size))
    )
    slide = open_slide(tmp / "archive" / "archive" / name)
    crop = slide.read_region((x, y), 0, (2 * size, 2 * size)).convert("RGB")
    slide.close()
    top = engine.search_region(crop, mpp=0.5, top_k=1).results[0]
    assert top.slide["id"] == ids[name]
    pixels, *features = top.regions
    assert (pixels.match, pixels.w, pixels.h) == ("pixels", 2 * size, 2 * size)
    assert abs(pixels.x - x) <= 2 and abs(pixels.y - y) <= 2  # 1 um at 0.5 um/px: the fine step's pixel
    assert pixels.score > 0.7
    assert {r.match for r in features} == {"features"}
    assert {(r.x, r.y) for r in features} == {(x + dx, y + dy) for dx in (0, size) for dy in (0, size)}


def test_place_on_features_on_a_feature_grid():
    """Placement is exact on vectors where it should be: a 2 x 3 query cut out of a 10 x 10
    grid of distinct vectors, rotated 90 degrees and mirrored, is put back where it was."""
    rng = np.random.default_rng(0)
    cells = np.array([(i, j) for j in range(10) for i in range(10)])
    xs = rng.standard_normal((100, 32)).astype(np.float32)
    src = [(4 + i, 6 + j) for j in range(3) for i in range(2)]
    xq = np.stack([xs[c[1] * 10 + c[0]] for c in src]) + 0.1 * rng.standard_normal((6, 32)).astype(np.float32)
    q_cells = np.array([(-(c[1] - 6), -(c[0] - 4)) for c in src])  # rotated + mirrored layout
    pick, sims = place_on_features(xq, q_cells, xs, cells)
    np.testing.assert_array_equal(pick, [c[1] * 10 + c[0] for c in src])
    assert (sims > 0.9).all()


def test_slide_query_finds_the_twin(archive):
    settings, engine, ids, tmp = archive
    result = engine.search_slide(ids["CMU-1-Small-Region.svs"], top_k=3).to_json()
    assert result["results"][0]["slide"]["id"] == ids["CMU-1-Small-Region.generic-pyramid.tiff"]
    assert ids["CMU-1-Small-Region.svs"] not in [r["slide"]["id"] for r in result["results"]]
    assert result["query"]["mosaic"] and all(set(b) == {"x", "y", "w", "h"} for b in result["query"]["mosaic"])
    assert result["suggestion"]["label"] == result["results"][0]["slide"]["label"] or result["suggestion"]["votes"]
    # a slide file that is not in the archive: the same pixels as blobs-a, written anew
    fresh = write_pyramidal_tiff(
        tmp / "outside" / "blobs-a-rescan.tiff", tissue_blobs(1800, 1800, seed=31, n_blobs=4), mpp=0.5, tile=512
    )
    result = engine.search_slide(fresh, top_k=2).to_json()
    assert result["query"]["slide_id"] is None
    assert result["results"][0]["slide"]["id"] == ids["blobs-a.tiff"]


def test_filters_and_exclusions(archive):
    settings, engine, ids, _ = archive
    query = Image.open(io.BytesIO(_png_of_tile(engine, ids["tcga-cr-7395-01a-01-ts1.svs"], mpp=0.5))).convert("RGB")
    res = engine.search_region(query, mpp=0.5, top_k=10, filters={"label": "CMU"})
    assert {h.slide["label"] for h in res.results} == {"CMU"} and len(res.results) == 2
    res = engine.search_region(query, mpp=0.5, top_k=10, exclude_patient="TCGA-CR-7395")
    assert ids["tcga-cr-7395-01a-01-ts1.svs"] not in [h.slide["id"] for h in res.results]
    assert len(res.results) == 4  # top_k larger than the archive: every other slide
    res = engine.search_region(
        query, mpp=0.5, top_k=2, exclude_slide_id=ids["tcga-cr-7395-01a-01-ts1.svs"], filters={"site": "skin"}
    )
    assert [h.slide["patient"] for h in res.results] == ["CMU-1", "CMU-1"]
    assert res.suggestion == {"label": "CMU", "votes": {"CMU": 2}}
    assert engine.search_region(query, mpp=0.5, filters={"site": "nowhere"}).results == []
    with pytest.raises(QueryError, match="unknown filter"):
        engine.search_region(query, mpp=0.5, filters={"colour": "pink"})


def _png_of_tile(engine, slide_id: int, mpp: float) -> bytes:
    with engine.catalog.session() as s:
        sl = s.get(Slide, slide_id)
        tile = s.scalars(
            sa.select(Tile).where(Tile.slide_id == slide_id).order_by(Tile.tissue_fraction.desc(), Tile.id)
        ).first()
        path, x, y, size = sl.path, tile.x, tile.y, tile.size
    slide = open_slide(path)
    img = slide.read_region((x, y), 0, (size, size)).convert("RGB")
    slide.close()
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_bad_queries_get_clear_errors(archive):
    settings, engine, ids, _ = archive
    with pytest.raises(QueryError, match="blank"):
        engine.search_region(Image.new("RGB", (600, 600), (245, 245, 245)), mpp=1.0)
    tissue = Image.open(io.BytesIO(_png_of_tile(engine, ids["CMU-1-Small-Region.svs"], mpp=0.5))).convert("RGB")
    with pytest.raises(QueryError, match="more than 4x apart"):
        engine.search_region(tissue, mpp=0.05)
    with pytest.raises(QueryError, match="at least 112"):
        engine.search_region(tissue.resize((60, 60)), mpp=1.0)
    with pytest.raises(EncoderError, match="not the one the index was built with"):
        SearchEngine(
            settings.__class__.load(
                env={},
                catalog_url=settings.catalog_url,
                index_dir=str(settings.index_dir),
                encoder="random:resnet18:1",
                device="cpu",
            ),
            catalog=engine.catalog,
        )


def test_cli_table_and_json(archive, tmp_path):
    settings, engine, ids, _ = archive
    crop = tmp_path / "crop.png"
    crop.write_bytes(_png_of_tile(engine, ids["tcga-cr-7395-01a-01-ts1.svs"], mpp=0.5))
    common = [
        "search",
        "--catalog",
        settings.catalog_url,
        "--index-dir",
        str(settings.index_dir),
        "--encoder",
        "random:resnet18",
        "--device",
        "cpu",
    ]
    runner = CliRunner()
    out = runner.invoke(main, [*common, "--image", str(crop), "--mpp", "0.5", "--top-k", "3", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert set(doc) == {"query", "results", "suggestion", "timing_ms", "degraded", "warnings"}
    assert doc["results"][0]["slide"]["id"] == ids["tcga-cr-7395-01a-01-ts1.svs"]
    assert set(doc["results"][0]["regions"][0]) == {"x", "y", "w", "h", "score", "match"}
    assert doc["timing_ms"]["refine"] >= 0
    # the crop is a copy of its slide: the table says its box was pinned from the pixels
    out = runner.invoke(main, [*common, "--image", str(crop), "--mpp", "0.5", "--top-k", "3"])
    assert out.exit_code == 0, out.output
    rows = [line for line in out.stdout.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert doc["results"][0]["regions"][0]["match"] == "pixels" and "exact" in rows[0]
    assert not any("exact" in row for row in rows[1:])
    out = runner.invoke(main, [*common, "--slide", str(ids["CMU-1-Small-Region.svs"]), "--top-k", "2"])
    assert out.exit_code == 0, out.output
    assert "CMU-1-Small-Region.generic-pyramid.tiff" in out.stdout and "suggestion" in out.stdout
    out = runner.invoke(main, [*common, "--slide", "99999"])
    assert out.exit_code == 1 and "no slide with id 99999" in out.output
    out = runner.invoke(main, [*common, "--image", str(crop), "--slide", "1"])
    assert out.exit_code == 2 and "exactly one of" in out.output
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")
    out = runner.invoke(main, [*common, "--image", str(not_image)])
    assert out.exit_code == 1 and "not a readable image" in out.output
