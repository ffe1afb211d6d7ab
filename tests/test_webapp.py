"""The web app through Flask's test client: every route needs a login, login/CSRF/token
rules, hostile uploads, slides and deep-zoom tiles of a real (synthetic pyramidal) slide,
benchmark pages, the OpenAPI document, and the users CLI. Searches against a real index are
in test_webapp_search.py."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image

from engine.cache import LRUCache
from engine.catalog import models
from engine.config import Settings
from engine.slides import fingerprint
from tests.conftest import _reset_postgres as reset_postgres
from tests.conftest import postgres_url
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff
from webapp import create_app, users
from webapp.cli import main as web_cli

PASSWORD = "correct horse"
# The layout `engine benchmark` stores (overall, per-class, curve, svm).
BENCHMARK_METRICS = {
    "overall": {"acc@1": 0.5, "acc@3": 0.75, "acc@5": 0.9, "mv@5": 0.55, "mmv@5": 0.4, "map@5": 0.45},
    "per_class": {
        "TUMOR": {"count": 3, "acc@1": 0.67, "mv@5": 1.0},
        "STROMA": {"count": 3, "acc@1": 0.33, "mv@5": 0.0},
    },
    "curve": {"k": [1, 2, 3, 4, 5], "acc": [0.5, 0.6, 0.75, 0.8, 0.9], "mv": [0.5, 0.5, 0.55, 0.5, 0.55]},
    "svm": {"folds": 3, "accuracy": 0.625, "balanced_accuracy": 0.6},
}


def make_app(tmp_path, catalog_url, **config):
    settings = Settings.load(
        env={}, data_dir=str(tmp_path / "data"), catalog_url=catalog_url, encoder="random:resnet18"
    )
    app = create_app({"TESTING": True, "SETTINGS": settings, "INSTANCE_PATH": str(tmp_path / "instance"), **config})
    return app


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def app(request, tmp_path_factory):
    """One app per module and database (building the catalog and hashing passwords takes
    seconds); tests only add rows, so they do not disturb each other."""
    tmp_path = tmp_path_factory.mktemp("webapp")
    if request.param == "sqlite":
        catalog_url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    else:
        catalog_url = postgres_url()
        reset_postgres(catalog_url)
    app = make_app(tmp_path, catalog_url, MAX_CONTENT_LENGTH=2 * 1024 * 1024)
    catalog = app.extensions["histoseek"].catalog
    users.create_user(catalog, "admin", PASSWORD, is_admin=True)
    users.create_user(catalog, "path", PASSWORD)
    slide_file = write_pyramidal_tiff(tmp_path / "slides" / "blobs.tiff", tissue_blobs(1200, 1600, seed=3), mpp=0.5)
    with catalog.session() as s:
        s.add_all(
            [
                models.Slide(
                    path=str(slide_file),
                    fingerprint=fingerprint(slide_file),
                    status=models.INDEXED,
                    tile_count=12,
                    width=1600,
                    height=1200,
                    mpp=0.5,
                    mpp_source="metadata",
                    diagnosis="adenocarcinoma",
                    site="colon",
                    label="TUM",
                    patient="P1",
                    collection="demo",
                ),
                models.Slide(
                    path=str(tmp_path / "slides" / "gone.svs"),
                    fingerprint="b" * 64,
                    status=models.FAILED,
                    error="gone.svs: no such file",
                ),
                *[
                    models.Slide(path=f"/archive/s{i:03d}.svs", fingerprint=f"{i:064d}", status=models.PENDING)
                    for i in range(60)
                ],
            ]
        )
        s.add(
            models.BenchmarkRun(
                dataset_kind="kather2016",
                dataset_path="patches/kather2016",
                encoder_name="random:resnet18",
                metrics=BENCHMARK_METRICS,
                parameters={"exclusion": "slide"},
            )
        )
        s.add(
            models.BenchmarkRun(
                dataset_kind="flat",
                dataset_path="y",
                encoder_name="e",
                metrics={"overall": {"acc@1": 0.25, "acc@5": 0.5}},
            )
        )
        s.add(models.BenchmarkRun(dataset_kind="empty", dataset_path="x", encoder_name="e", metrics={}))
    yield app
    catalog.dispose()


def ids(app):
    with app.extensions["histoseek"].catalog.session() as s:
        slide = s.scalar(sa.select(models.Slide.id).where(models.Slide.status == "indexed"))
        missing = s.scalar(sa.select(models.Slide.id).where(models.Slide.status == "failed"))
        run = s.scalar(sa.select(models.BenchmarkRun.id).where(models.BenchmarkRun.dataset_kind == "kather2016"))
    return slide, missing, run


def csrf_from(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def login(client, username="path", password=PASSWORD):
    token = csrf_from(client.get("/login").text)
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token})


@pytest.fixture
def client(app):
    client = app.test_client()
    assert login(client).status_code == 302
    return client


def csrf(client) -> str:
    return csrf_from(client.get("/account").text)


def concrete_urls(app):
    """Every route of the app with real ids filled in (so new routes are covered too)."""
    slide, _, run = ids(app)
    values = {"slide_id": slide, "run_id": run, "level": 0, "col": 0, "row": 0, "fmt": "jpeg", "name": "example"}
    urls = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        url = rule.rule
        for name in rule.arguments:
            url = re.sub(rf"<(?:[a-z]+:)?{name}>", str(values[name]), url)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            urls.append((method, url, rule.endpoint))
    return urls


def test_every_route_requires_login(app):
    client = app.test_client()
    checked = 0
    for method, url, endpoint in concrete_urls(app):
        if endpoint == "auth.login":
            continue
        response = client.open(url, method=method)
        if url.startswith(("/api/", "/tiles/")):
            assert response.status_code == 401, (method, url)
            assert response.json["error"] == "unauthorized"
        else:
            assert response.status_code == 302, (method, url)
            assert response.headers["Location"].startswith("/login")
        checked += 1
    assert checked >= 20


def test_login_logout_and_audit(app):
    client = app.test_client()
    assert login(client, password="wrong password").status_code == 401
    response = login(client)
    assert response.status_code == 302 and response.headers["Location"] == "/"
    assert client.get("/").status_code == 200
    response = client.post("/logout", data={"csrf_token": csrf(client)})
    assert response.status_code == 302
    assert client.get("/").status_code == 302
    with app.extensions["histoseek"].catalog.session() as s:
        actions = [e.action for e in s.scalars(sa.select(models.AuditEvent).order_by(models.AuditEvent.id))]
    assert actions[-3:] == ["login_failed", "login", "logout"]


def test_repeated_failed_logins_are_throttled(app):
    catalog = app.extensions["histoseek"].catalog
    users.create_user(catalog, "target", PASSWORD)
    client = app.test_client()
    limit = app.config["LOGIN_MAX_FAILURES"]
    for _ in range(limit):
        assert login(client, "target", "guess guess").status_code == 401
    assert login(client, "target", PASSWORD).status_code == 429  # even the right password, for now
    assert login(client, "path").status_code == 302  # other users are not locked out


def test_login_follows_only_local_next(app):
    client = app.test_client()
    for target, expected in (
        ("/archive?page=2", "/archive?page=2"),
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
    ):
        token = csrf_from(client.get("/login").text)
        response = client.post(
            f"/login?next={target}", data={"username": "path", "password": PASSWORD, "csrf_token": token}
        )
        assert response.headers["Location"] == expected


def test_forms_need_csrf_token(app, client):
    fresh = app.test_client()
    fresh.get("/login")
    assert fresh.post("/login", data={"username": "path", "password": PASSWORD}).status_code == 400
    assert client.post("/logout").status_code == 400
    assert client.post("/api/v1/search/slide", json={"slide_id": 1}).status_code == 400
    assert client.get("/").status_code == 200  # still logged in


def test_api_token(app):
    catalog = app.extensions["histoseek"].catalog
    token = users.issue_token(catalog, "path")
    client = app.test_client()
    response = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200 and response.json["username"] == "path" and response.json["auth"] == "token"
    assert client.get("/api/v1/me", headers={"Authorization": "Bearer hs_not-a-token"}).status_code == 401
    newer = users.issue_token(catalog, "path")
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {newer}"}).status_code == 200
    with catalog.session() as s:
        stored = s.scalar(sa.select(models.User.api_token_hash).where(models.User.username == "path"))
    assert stored and newer not in stored


def test_account_page_issues_token(client):
    response = client.post("/account", data={"csrf_token": csrf(client)})
    token = re.search(r'id="token" readonly value="([^"]+)"', response.text).group(1)
    assert (
        client.application.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code
        == 200
    )


def test_slides_list_filter_and_page(app, client):
    body = client.get("/api/v1/slides?per_page=25").json
    assert body["total"] == 62 and len(body["slides"]) == 25 and body["pages"] == 3
    assert client.get("/api/v1/slides?page=3&per_page=25").json["slides"][-1]["name"] == "s059.svs"
    indexed = client.get("/api/v1/slides?status=indexed").json
    assert [s["diagnosis"] for s in indexed["slides"]] == ["adenocarcinoma"]
    assert client.get("/api/v1/slides?q=S00").json["total"] == 10
    assert client.get("/api/v1/slides?site=colon").json["total"] == 1
    for bad in ("status=lost", "page=0", "per_page=x"):
        response = client.get(f"/api/v1/slides?{bad}")
        assert response.status_code == 400 and set(response.json) == {"error", "message"}
    page = client.get("/archive?status=failed")
    assert page.status_code == 200 and "gone.svs: no such file" in page.text
    assert "page 2 / 2" in client.get("/archive?page=2").text


def test_slide_detail_dzi_tiles_and_regions(app, client):
    slide, missing, _ = ids(app)
    detail = client.get(f"/api/v1/slides/{slide}").json
    assert detail["width"] == 1600 and detail["dzi"] == f"/tiles/{slide}.dzi"
    response = client.get(f"/tiles/{slide}.dzi")
    image = ET.fromstring(response.data)
    size = image.find("{*}Size")
    assert (size.get("Width"), size.get("Height"), image.get("TileSize")) == ("1600", "1200", "254")
    top = 11  # ceil(log2(1600)) = 11: the full-resolution level
    tile = Image.open(io.BytesIO(client.get(f"/tiles/{slide}_files/{top}/0_0.jpeg").data))
    assert tile.size == (255, 255)  # 254 + 1 px overlap on the right/bottom
    assert Image.open(io.BytesIO(client.get(f"/tiles/{slide}_files/{top}/6_4.png").data)).size[0] > 0
    again = client.get(f"/tiles/{slide}_files/{top}/0_0.jpeg").data
    assert again == client.get(f"/tiles/{slide}_files/{top}/0_0.jpeg").data
    assert any(
        key[0] == slide and key[2:] == (top, 0, 0, "JPEG")
        for key in app.extensions["histoseek"].slides.tile_bytes.keys()
    )
    assert client.get(f"/tiles/{slide}_files/{top}/99_0.jpeg").status_code == 404
    assert client.get(f"/tiles/{slide}_files/40/0_0.jpeg").status_code == 404
    assert client.get(f"/tiles/{slide}_files/{top}/0_0.gif").status_code == 404
    region = Image.open(
        io.BytesIO(client.get(f"/api/v1/slides/{slide}/region.jpg?x=100&y=200&w=448&h=224&px=128").data)
    )
    assert region.size == (128, 64)
    assert client.get(f"/api/v1/slides/{slide}/region.jpg?x=1500&y=0&w=448&h=224").status_code == 404
    thumb = Image.open(io.BytesIO(client.get(f"/api/v1/slides/{slide}/thumbnail.jpg?px=200").data))
    assert thumb.size == (200, 150)
    for url in ("/api/v1/slides/99999", "/tiles/99999.dzi", "/tiles/99999_files/0/0_0.jpeg"):
        response = client.get(url)
        assert response.status_code == 404 and response.json["error"] == "not_found"
    response = client.get(f"/tiles/{missing}.dzi")
    assert response.status_code == 422 and "no such file" in response.json["message"]


def test_tile_cache_is_bounded_in_bytes():
    cache = LRUCache(100, weight=len)
    for i in range(3):
        cache.put(("k", i), bytes(40))
    assert cache.get(("k", 0)) is None and cache.get(("k", 1)) is not None
    cache.put(("k", 3), bytes(40))  # ("k", 1) was used last, so ("k", 2) goes
    assert cache.get(("k", 2)) is None and cache.get(("k", 1)) is not None
    cache.put(("big",), bytes(101))
    assert cache.get(("big",)) is None


def test_viewer_page(app, client):
    slide, _, _ = ids(app)
    page = client.get(f"/viewer/{slide}?box=10,20,224,224,0.91&box=300,300,224,224")
    assert page.status_code == 200
    boxes = re.search(r'<script type="application/json" id="viewer-boxes">(.*?)</script>', page.text, re.S).group(1)
    assert '"x": 10' in boxes and '"score": 0.91' in boxes and "adenocarcinoma" in page.text
    assert "openseadragon.min.js" in page.text
    assert client.get(f"/viewer/{slide}?box=1,2,x,4").status_code == 400
    assert client.get("/viewer/99999").status_code == 404


def test_static_openseadragon_is_served_locally(client):
    assert (
        client.get("/static/node_modules/openseadragon/build/openseadragon/openseadragon.min.js").status_code == 200
    ), "run `make setup` (npm ci in webapp/static)"


def test_benchmark_pages_and_plot(app, client):
    _, _, run = ids(app)
    runs = client.get("/api/v1/benchmarks").json["runs"]
    assert {r["dataset_kind"] for r in runs} == {"kather2016", "flat", "empty"}
    listing = client.get("/benchmarks").text
    assert "75.00" in listing and "kather2016" in listing and "mmv@5" in listing
    detail = client.get(f"/benchmarks/{run}")
    assert detail.status_code == 200 and "plot.png" in detail.text
    assert "62.50" in detail.text  # SVM accuracy
    assert re.search(r"<th scope=\"row\">STROMA</th><td class=\"num\">3</td>", detail.text)
    plot = client.get(f"/benchmarks/{run}/plot.png")
    assert plot.mimetype == "image/png" and Image.open(io.BytesIO(plot.data)).size == (
        1280,
        360,
    )  # curve + per-class bars
    flat = next(r["id"] for r in runs if r["dataset_kind"] == "flat")
    assert Image.open(io.BytesIO(client.get(f"/benchmarks/{flat}/plot.png").data)).size == (640, 360)
    assert "25.00" in client.get(f"/benchmarks/{flat}").text
    empty = next(r["id"] for r in runs if r["dataset_kind"] == "empty")
    assert client.get(f"/benchmarks/{empty}/plot.png").status_code == 404
    assert client.get(f"/benchmarks/{empty}").status_code == 200
    assert client.get("/api/v1/benchmarks/99999").status_code == 404


def test_audit_log_is_for_admins(app, client):
    assert client.get("/audit").status_code == 403
    admin = app.test_client()
    login(admin, "admin")
    page = admin.get("/audit")
    assert page.status_code == 200 and "login" in page.text and "user_created" in page.text


def test_openapi_lists_every_api_route(app, client):
    doc = client.get("/api/v1/openapi.json").json
    assert doc["openapi"].startswith("3.")
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith(("api.", "tiles.")):
            path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
            if rule.endpoint == "tiles.tile":
                path = path.replace("{fmt}", "jpeg")
            assert path in doc["paths"], path
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                assert method.lower() in doc["paths"][path], (method, path)


def region_png(size=(256, 256), blank=False) -> bytes:
    rgb = np.full((size[1], size[0], 3), 245, np.uint8) if blank else tissue_blobs(size[1], size[0], seed=1, n_blobs=6)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def post_region(client, data: bytes, filename="region.png", **fields):
    form = {"image": (io.BytesIO(data), filename), "magnification": "20", "csrf_token": csrf(client), **fields}
    return client.post("/api/v1/search/region", data=form, content_type="multipart/form-data")


def bomb_png(edge: int) -> bytes:
    """An edge x edge PNG that compresses to ~100 kB: 8,000 px passes PIL's own bomb guard
    and must meet the app's MAX_UPLOAD_PIXELS; 12,000 px trips PIL's guard too."""
    buf = io.BytesIO()
    Image.new("1", (edge, edge)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("oversize", 413, "larger than"),
        ("not_image", 415, "not an image"),
        ("fake_png_name", 415, "not an image"),
        ("bomb", 400, "crop a smaller region"),
        ("huge_bomb", 400, "crop a smaller region"),
        ("truncated", 400, "not a readable image"),
        ("tiny", 422, "at least 32"),
        ("blank", 422, "looks blank"),
        ("bad_resolution", 400, "mpp must be a number"),
        ("bad_top_k", 400, "top_k"),
        ("no_file", 400, "choose an image"),
    ],
)
def test_hostile_or_bad_uploads_refused(client, case, status, message):
    data, fields, filename = region_png(), {}, "region.png"
    if case == "oversize":
        data = b"\x89PNG\r\n\x1a\n" + bytes(3 * 1024 * 1024)
    elif case == "not_image":
        data, filename = b"#!/bin/sh\nrm -rf /\n", "run.sh"
    elif case == "fake_png_name":
        data = b"<html><script>alert(1)</script></html>"
    elif case in ("bomb", "huge_bomb"):
        data = bomb_png(8_000 if case == "bomb" else 12_000)
        assert len(data) < 2 * 1024 * 1024
    elif case == "truncated":
        data = data[: len(data) // 3]
    elif case == "tiny":
        data = region_png((20, 20))
    elif case == "blank":
        data = region_png(blank=True)
    elif case == "bad_resolution":  # no resolution at all is fine: the engine estimates it
        fields = {"mpp": "fast"}
    elif case == "bad_top_k":
        fields = {"top_k": "1000"}
    if case == "no_file":
        response = client.post(
            "/api/v1/search/region",
            data={"magnification": "20", "csrf_token": csrf(client)},
            content_type="multipart/form-data",
        )
    else:
        response = post_region(client, data, filename, **fields)
    assert response.status_code == status, response.json
    assert set(response.json) == {"error", "message"} and message in response.json["message"]
    assert client.get("/api/v1/slides").status_code == 200  # and the app keeps serving


def test_page_upload_errors_return_to_the_form(app, client):
    response = client.post(
        "/search/region",
        data={
            "image": (io.BytesIO(region_png(blank=True)), "blank.png"),
            "magnification": "20",
            "csrf_token": csrf(client),
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 422
    assert "looks blank" in response.text and 'id="region-form"' in response.text
    response = client.get("/search/slide?slide_id=abc")
    assert response.status_code == 400 and 'id="slide-form"' in response.text


def test_users_cli(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    runner = CliRunner()
    base = ["--catalog", url]
    result = runner.invoke(
        web_cli, ["users", "add", "carol", "--admin", "--password-stdin", *base], input="long enough pw\n"
    )
    assert result.exit_code == 0, result.output
    assert "created user carol (admin)" in result.output
    again = runner.invoke(web_cli, ["users", "add", "carol", "--password-stdin", *base], input="long enough pw\n")
    assert again.exit_code == 2 and "exists already" in again.output
    short = runner.invoke(web_cli, ["users", "add", "dave", "--password-stdin", *base], input="short\n")
    assert short.exit_code == 2 and "at least 8" in short.output
    token = runner.invoke(web_cli, ["users", "token", "carol", *base])
    assert token.exit_code == 0 and token.output.strip().startswith("hs_")
    missing = runner.invoke(web_cli, ["users", "token", "nobody", *base])
    assert missing.exit_code == 1 and "users add nobody" in missing.output
    listing = runner.invoke(web_cli, ["users", "list", *base])
    assert "carol\tadmin\ttoken" in listing.output
    assert (
        runner.invoke(
            web_cli, ["users", "passwd", "carol", "--password-stdin", *base], input="another long pw\n"
        ).exit_code
        == 0
    )
    app = make_app(tmp_path, url)
    assert users.authenticate(app.extensions["histoseek"].catalog, "carol", "another long pw") is not None
    assert "gunicorn" in runner.invoke(web_cli, ["serve", "--help"]).output


def test_secret_key_is_created_once_and_shared(tmp_path, sqlite_url):
    settings = Settings.load(env={}, data_dir=str(tmp_path), catalog_url=sqlite_url, encoder="random:resnet18")
    first = create_app({"SETTINGS": settings, "INSTANCE_PATH": str(tmp_path / "inst")})
    second = create_app({"SETTINGS": settings, "INSTANCE_PATH": str(tmp_path / "inst")})
    assert first.config["SECRET_KEY"] == second.config["SECRET_KEY"] and len(first.config["SECRET_KEY"]) == 64
    assert (tmp_path / "inst" / "secret_key").stat().st_mode & 0o077 == 0
