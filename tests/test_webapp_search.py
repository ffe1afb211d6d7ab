"""Searches through the web app against a real small index (synthetic pyramidal slides
indexed by `indexer build`'s library function, random ResNet-18): the API and the pages
find the slide a region was cropped from, slide search leaves the query slide out, filters
apply, and every search lands in the audit log."""

from __future__ import annotations

import io
import re

import pytest
import sqlalchemy as sa

from engine.catalog import models
from engine.slides import read_tile
from tests.indexed_archive import make_indexed_archive
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff
from webapp import create_app, users

PASSWORD = "search test pw"
SLIDES = [
    ("alpha.tiff", 21, {"site": "colon", "diagnosis": "adenocarcinoma", "label": "TUM", "patient": "P1"}),
    ("beta.tiff", 22, {"site": "colon", "diagnosis": "normal mucosa", "label": "NORM", "patient": "P2"}),
    ("gamma.tiff", 23, {"site": "liver", "diagnosis": "metastasis", "label": "TUM", "patient": "P3"}),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    files = [
        write_pyramidal_tiff(tmp / "src" / name, tissue_blobs(1100, 1100, seed=seed, n_blobs=4), mpp=0.5)
        for name, seed, _ in SLIDES
    ]
    rows = [{"slide": name, "collection": "test", **meta} for name, _, meta in SLIDES]
    settings = make_indexed_archive(tmp / "archive", files, metadata_rows=rows)
    app = create_app({"TESTING": True, "SETTINGS": settings, "INSTANCE_PATH": str(tmp / "instance")})
    users.create_user(app.extensions["histoseek"].catalog, "path", PASSWORD)
    yield app
    app.extensions["histoseek"].catalog.dispose()


@pytest.fixture
def client(app):
    client = app.test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    assert (
        client.post("/login", data={"username": "path", "password": PASSWORD, "csrf_token": token}).status_code == 302
    )
    return client


def csrf(client) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/account").text).group(1)


def slide_and_tile(app, name):
    with app.extensions["histoseek"].catalog.session() as s:
        slide = s.scalar(sa.select(models.Slide).where(models.Slide.path.like(f"%{name}")))
        tile = s.scalars(
            sa.select(models.Tile)
            .where(models.Tile.slide_id == slide.id)
            .order_by(models.Tile.tissue_fraction.desc(), models.Tile.id)
        ).first()
    return slide, tile


def crop_png(slide, tile) -> bytes:
    image = read_tile(slide.path, tile.x, tile.y, tile.size, tile.size)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["alpha.tiff", "gamma.tiff"])
def test_api_region_search_finds_the_source_slide(app, client, name):
    slide, tile = slide_and_tile(app, name)
    form = {
        "image": (io.BytesIO(crop_png(slide, tile)), "crop.png"),
        "mpp": "0.5",
        "top_k": "3",
        "csrf_token": csrf(client),
    }
    response = client.post("/api/v1/search/region", data=form, content_type="multipart/form-data")
    assert response.status_code == 200, response.json
    result = response.json
    first = result["results"][0]
    assert first["rank"] == 1 and first["slide"]["id"] == slide.id
    assert first["slide"]["diagnosis"] == dict((n, m) for n, _, m in SLIDES)[name]["diagnosis"]
    assert any(abs(r["x"] - tile.x) <= tile.size and abs(r["y"] - tile.y) <= tile.size for r in first["regions"])
    assert len(result["results"]) <= 3
    assert result["suggestion"]["label"] in {"TUM", "NORM"}


def test_api_region_search_with_token_and_filters(app, client):
    slide, tile = slide_and_tile(app, "alpha.tiff")
    token = users.issue_token(app.extensions["histoseek"].catalog, "path")
    fresh = app.test_client()
    form = {"image": (io.BytesIO(crop_png(slide, tile)), "crop.png"), "magnification": "20", "site": "liver"}
    response = fresh.post(
        "/api/v1/search/region",
        data=form,
        content_type="multipart/form-data",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.json
    assert {r["slide"]["site"] for r in response.json["results"]} == {"liver"}


def test_api_slide_search_leaves_the_query_out(app, client):
    slide, _ = slide_and_tile(app, "beta.tiff")
    response = client.post(
        "/api/v1/search/slide", json={"slide_id": slide.id, "top_k": 5}, headers={"X-CSRF-Token": csrf(client)}
    )
    assert response.status_code == 200, response.json
    ids = [r["slide"]["id"] for r in response.json["results"]]
    assert ids and slide.id not in ids
    missing = client.post("/api/v1/search/slide", json={"slide_id": 999999}, headers={"X-CSRF-Token": csrf(client)})
    assert missing.status_code == 404 and missing.json["error"] == "not_found"
    bad = client.post("/api/v1/search/slide", json={"slide_id": "x"}, headers={"X-CSRF-Token": csrf(client)})
    assert bad.status_code == 400
    not_object = client.post("/api/v1/search/slide", json=[slide.id], headers={"X-CSRF-Token": csrf(client)})
    assert not_object.status_code == 400 and "JSON object" in not_object.json["message"]


def test_results_page_and_viewer_link(app, client):
    slide, tile = slide_and_tile(app, "gamma.tiff")
    form = {
        "image": (io.BytesIO(crop_png(slide, tile)), "crop.png"),
        "mpp": "0.5",
        "top_k": "3",
        "csrf_token": csrf(client),
    }
    page = client.post("/search/region", data=form, content_type="multipart/form-data")
    assert page.status_code == 200
    first = re.search(r'<a class="slide-link" href="([^"]+)">([^<]+)</a>', page.text)
    assert first.group(2) == "gamma.tiff"
    viewer = client.get(first.group(1).replace("&amp;", "&"))
    assert viewer.status_code == 200 and '"score":' in viewer.text and "metastasis" in viewer.text
    thumbs = re.findall(r'src="(/api/v1/slides/\d+/region\.jpg[^"]+)"', page.text)
    assert thumbs and client.get(thumbs[0].replace("&amp;", "&")).mimetype == "image/jpeg"
    by_slide = client.get(f"/search/slide?slide_id={slide.id}&top_k=2")
    assert by_slide.status_code == 200 and "Similar cases" in by_slide.text


def test_searches_are_audited(app, client):
    slide, tile = slide_and_tile(app, "alpha.tiff")
    form = {"image": (io.BytesIO(crop_png(slide, tile)), "audit-me.png"), "mpp": "0.5", "csrf_token": csrf(client)}
    assert client.post("/api/v1/search/region", data=form, content_type="multipart/form-data").status_code == 200
    with app.extensions["histoseek"].catalog.session() as s:
        event = s.scalars(
            sa.select(models.AuditEvent)
            .where(models.AuditEvent.action == "search_region")
            .order_by(models.AuditEvent.id.desc())
        ).first()
        username = s.get(models.User, event.user_id).username
    assert username == "path" and event.detail["filename"] == "audit-me.png" and event.detail["mpp"] == 0.5
    assert event.detail["top_slide_ids"][0] == slide.id


def test_region_of_unknown_magnification_is_estimated(app, client):
    """No mpp and no magnification (the form's default): the engine estimates the scale, and
    the API and the results page report it with each candidate's score."""
    slide, tile = slide_and_tile(app, "beta.tiff")
    form = {"image": (io.BytesIO(crop_png(slide, tile)), "crop.png"), "top_k": "3", "csrf_token": csrf(client)}
    response = client.post("/api/v1/search/region", data=form, content_type="multipart/form-data")
    assert response.status_code == 200, response.json
    scale = response.json["query"]["scale"]
    assert scale["estimated_mpp"] > 0 and len(scale["candidates"]) >= 2
    assert response.json["query"]["mpp_given"] is False
    search_page = client.get("/")
    assert "unknown — estimate it" in search_page.text
    form = {"image": (io.BytesIO(crop_png(slide, tile)), "crop.png"), "top_k": "3", "csrf_token": csrf(client)}
    page = client.post("/search/region", data=form, content_type="multipart/form-data")
    assert page.status_code == 200
    assert 'id="estimated-mpp"' in page.text and 'id="scale-candidates"' in page.text


def test_example_regions_are_offered_and_searched_with_one_click(app, client, tmp_path):
    """EXAMPLES_DIR: the search page shows each example; its link runs the region search
    with the example's resolution, and a name that is not an example is a 404."""
    from webapp.examples import Example, write_index

    slide, tile = slide_and_tile(app, "beta.tiff")
    (tmp_path / "beta-crop.png").write_bytes(crop_png(slide, tile))
    write_index(tmp_path, [Example("beta-crop", "beta-crop.png", "A crop of beta", "from the archive", 0.5)])
    app.config["EXAMPLES_DIR"] = str(tmp_path)
    try:
        page = client.get("/").text
        assert "A crop of beta" in page and "/search/example/beta-crop" in page
        assert client.get("/examples/beta-crop").status_code == 200
        results = client.get("/search/example/beta-crop")
        assert results.status_code == 200 and "beta.tiff" in results.text
        assert client.get("/search/example/nothing-here").status_code == 404
        assert client.get("/examples/..%2Fsecret").status_code == 404
    finally:
        app.config["EXAMPLES_DIR"] = ""


def test_a_blank_region_is_refused_by_the_loaded_engine_with_the_same_message(app, client):
    """Once the engine is loaded the web app leaves the tissue rule to it (one mask per
    query): a blank upload still gets 422 "looks blank"."""
    from PIL import Image

    app.extensions["histoseek"].search_engine()
    buf = io.BytesIO()
    Image.new("RGB", (600, 600), (243, 243, 243)).save(buf, format="PNG")
    form = {"image": (io.BytesIO(buf.getvalue()), "glass.png"), "mpp": "0.5", "csrf_token": csrf(client)}
    response = client.post("/api/v1/search/region", data=form, content_type="multipart/form-data")
    assert response.status_code == 422 and "looks blank" in response.json["message"], response.json
