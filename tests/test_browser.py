"""End to end in a real headless Chromium (Debian's, driven by playwright) against the app
served by gunicorn on loopback: log in, upload a region cropped from an indexed real slide,
see that slide at rank 1, open the viewer and see the matched region outlined. Hostile
uploads against the same server get 4xx and the server keeps serving."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from PIL import Image

from engine.catalog import Catalog, models
from engine.slides import open_slide, read_box
from tests.indexed_archive import make_indexed_archive
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff
from webapp import users

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
USER, PASSWORD = "pathologist", "browser test pw"
REAL_SLIDE = "CMU-1-Small-Region.svs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory, shared_data):
    """A real slide plus two synthetic distractors, indexed with `indexer build`'s library
    function; a user to log in with."""
    tmp = tmp_path_factory.mktemp("browser")
    distractors = [
        write_pyramidal_tiff(tmp / "src" / f"synthetic-{i}.tiff", tissue_blobs(1400, 1400, seed=10 + i), mpp=0.5)
        for i in range(2)
    ]
    slides = [shared_data / "slides" / "real" / REAL_SLIDE, *distractors]
    rows = [
        {
            "slide": REAL_SLIDE,
            "patient": "CMU-1",
            "site": "skin",
            "diagnosis": "real H&E sample",
            "label": "real",
            "collection": "test",
        },
        {
            "slide": "synthetic-0.tiff",
            "patient": "S0",
            "site": "colon",
            "diagnosis": "synthetic",
            "label": "synthetic",
            "collection": "test",
        },
        {
            "slide": "synthetic-1.tiff",
            "patient": "S1",
            "site": "colon",
            "diagnosis": "synthetic",
            "label": "synthetic",
            "collection": "test",
        },
    ]
    settings = make_indexed_archive(tmp, slides, metadata_rows=rows)
    catalog = Catalog(settings.catalog_url)
    users.create_user(catalog, USER, PASSWORD)
    with catalog.session() as s:
        slide = s.scalar(sa.select(models.Slide).where(models.Slide.path.like(f"%{REAL_SLIDE}")))
        tiles = s.scalars(
            sa.select(models.Tile)
            .where(models.Tile.slide_id == slide.id)
            .order_by(models.Tile.tissue_fraction.desc(), models.Tile.id)
        ).all()
    catalog.dispose()
    assert slide.status == "indexed" and tiles, "the real slide must be indexed for this test"
    return {"settings": settings, "tmp": tmp, "slide": slide, "tile": tiles[0]}


@pytest.fixture(scope="module")
def server(archive):
    """`histoseek-web serve` (gunicorn) on a free loopback port; stopped at the end."""
    settings, tmp = archive["settings"], archive["tmp"]
    port = free_port()
    env = {**os.environ, "HISTOSEEK_INSTANCE_DIR": str(tmp / "instance")}
    cmd = [
        sys.executable,
        "-m",
        "webapp.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
        "--threads",
        "4",
        "--catalog",
        settings.catalog_url,
        "--index-dir",
        str(settings.index_dir),
        "--encoder",
        settings.encoder,
        "--device",
        "cpu",
    ]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(base + "/login", timeout=2).read()
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the web server did not start:\n" + (tmp / "server.log").read_text()[-3000:])
            time.sleep(0.3)
    yield base
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # a worker still busy: nothing of it is needed any more
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def region_file(archive) -> Path:
    """An indexed tile's area of the real slide, cropped at full resolution (~0.5 um/px),
    saved as a PNG, as a pathologist would export it."""
    tile, slide = archive["tile"], archive["slide"]
    handle = open_slide(slide.path)
    try:
        crop = read_box(handle, tile.x, tile.y, tile.size, tile.size)
    finally:
        handle.close()
    path = archive["tmp"] / "region.png"
    crop.save(path)
    return path


@pytest.mark.slow
@pytest.mark.browser
def test_search_and_view_in_chromium(server, archive, region_file, test_output):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    outside, failed, console_errors = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.on(
            "request",
            lambda r: (
                outside.append(r.url)
                if urlsplit(r.url).hostname not in ("127.0.0.1", None) and not r.url.startswith("data:")
                else None
            ),
        )
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        try:
            page.goto(server + "/")
            assert "/login" in page.url
            page.get_by_label("User name").fill(USER)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(server + "/")

            page.set_input_files("#image", str(region_file))
            page.get_by_label("or microns per pixel").fill(f"{archive['slide'].mpp:.4f}")
            page.get_by_label("Magnification").select_option("")
            page.screenshot(path=str(test_output / "1-search.png"), full_page=True)
            page.get_by_role("button", name="Search by region").click()
            page.wait_for_selector("#results li.result", timeout=60_000)

            first = page.locator("#results li.result").first
            assert first.locator(".rank").inner_text() == "#1"
            assert first.locator(".slide-link").inner_text() == REAL_SLIDE
            assert first.locator(".regions img").count() >= 1
            page.wait_for_function(
                "() => [...document.querySelectorAll('.regions img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            page.screenshot(path=str(test_output / "2-results.png"), full_page=True)  # after the thumbnails loaded
            # majority vote over all three slides: two synthetic ones outvote the real one
            votes = dict(
                zip(
                    page.locator("table.votes th").all_inner_texts(), page.locator("table.votes td.n").all_inner_texts()
                )
            )
            assert votes == {"synthetic": "2", "real": "1"}
            assert page.locator("#suggested-label").inner_text() == "synthetic"

            first.locator(".slide-link").click()
            page.wait_for_selector("#osd[data-ready='1']", timeout=30_000)
            overlay = page.locator("#match-0")
            overlay.wait_for(state="visible")
            box = overlay.bounding_box()
            assert box and box["width"] > 2 and box["height"] > 2
            page.get_by_role("button", name="Region 1").click()
            page.wait_for_timeout(1500)  # let the zoom animation finish and tiles load
            assert page.locator("#match-0.active").count() == 1
            page.screenshot(path=str(test_output / "3-viewer.png"), full_page=True)
            assert REAL_SLIDE in page.locator("h1").inner_text()

            # the same region with its magnification unknown: the engine estimates it, the
            # results page says what it found, and the source still comes first
            page.goto(server + "/")
            page.set_input_files("#image", str(region_file))
            assert page.get_by_label("Magnification").input_value() == ""  # the default: estimate it
            page.get_by_role("button", name="Search by region").click()
            page.wait_for_selector("#results li.result", timeout=90_000)
            assert page.locator("#results li.result .slide-link").first.inner_text() == REAL_SLIDE
            estimated = page.locator("#estimated-mpp").inner_text()
            assert "Resolution estimated" in estimated and page.locator("#scale-candidates tr").count() >= 3
            page.screenshot(path=str(test_output / "4-unknown-mpp.png"), full_page=True)
        finally:
            browser.close()
    assert not outside, f"pages must not load anything from the internet: {outside[:5]}"
    assert not failed, f"requests failed: {failed[:5]}"
    assert not console_errors, console_errors
    for name in ("2-results.png", "3-viewer.png"):
        assert (test_output / name).stat().st_size > 10_000


def _post(url: str, body: bytes, content_type: str, headers: dict) -> tuple[int, dict]:
    """POST that still reads the answer when the server refuses the body early: for an
    oversize upload gunicorn answers 413 from the headers and closes the socket while the
    client is still sending (a broken pipe on the client side, not an error)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.putrequest("POST", parts.path)
    for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **headers}.items():
        conn.putheader(key, value)
    conn.endheaders()
    try:
        for start in range(0, len(body), 1 << 16):
            conn.send(body[start : start + (1 << 16)])
    except (BrokenPipeError, ConnectionResetError):
        pass
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    return resp.status, doc


def _multipart(filename: str, data: bytes, fields: dict) -> tuple[bytes, str]:
    boundary = "histoseek-test-boundary"
    out = io.BytesIO()
    for key, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    out.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'.encode()
    )
    out.write(data + f"\r\n--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.slow
def test_gunicorn_refuses_hostile_uploads_and_keeps_serving(server, archive, region_file):
    catalog = Catalog(archive["settings"].catalog_url)
    token = users.issue_token(catalog, USER)
    catalog.dispose()
    auth = {"Authorization": f"Bearer {token}"}
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")
    cases = {
        "oversize": (b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024), 413),
        "not an image": (b"MZ\x90\x00 not a picture", 415),
        "bomb": (bomb.getvalue(), 400),
    }
    for name, (data, status) in cases.items():
        body, ctype = _multipart("x.png", data, {"magnification": "20"})
        code, doc = _post(server + "/api/v1/search/region", body, ctype, auth)
        assert code == status, (name, doc)
        assert set(doc) == {"error", "message"}
    body, ctype = _multipart(
        "region.png", region_file.read_bytes(), {"mpp": f"{archive['slide'].mpp:.4f}", "top_k": "3"}
    )
    code, doc = _post(server + "/api/v1/search/region", body, ctype, auth)
    assert code == 200 and doc["results"][0]["slide"]["path"].endswith(REAL_SLIDE)
    unauthenticated = urllib.request.Request(server + "/api/v1/slides")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(unauthenticated, timeout=10)
    assert err.value.code == 401


def _mil_run_on(archive) -> int:
    """A tiny MIL run (label real/synthetic) on this archive's own indexed features, stored
    in its catalog. Three slides cannot be cross-validated, so each slide's tiles are split
    into four bags of their own group: enough for a run whose attention the viewer shows."""
    import numpy as np

    from engine.mil import BagSet, MilOptions, load_bags, train_run
    from engine.mil.report import store_run
    from engine.mil.train import TrainOptions

    settings = archive["settings"]
    whole = load_bags(settings.catalog_url, settings.index_dir, "label", group="slide")
    rng = np.random.default_rng(0)
    parts = []
    for bag in whole.bags:
        for k, rows in enumerate(np.array_split(rng.permutation(len(bag.features)), 4)):
            parts.append(
                type(bag)(
                    bag.slide_id * 10 + k,
                    bag.name,
                    bag.label,
                    f"{bag.slide_id}-{k}",
                    bag.features[rows],
                    bag.tile_ids[rows],
                    bag.boxes[rows],
                )
            )
    bags = BagSet(parts, whole.classes, whole.contract, [])
    out = archive["tmp"] / "mil-run"
    report = train_run(
        bags,
        out,
        MilOptions(folds=2, device="cpu", progress=False, train=TrainOptions(hidden=32, attention=16, max_epochs=3)),
    )
    return store_run(
        settings.catalog_url,
        out,
        report["contract"],
        {
            "label_column": "label",
            "group": "slide",
            "folds": 2,
            "classes": list(bags.classes),
            "counts": report["counts"],
        },
        report["metrics"],
        None,
    )


@pytest.mark.slow
@pytest.mark.browser
def test_attention_layer_in_chromium(server, archive, test_output):
    """The viewer's MIL attention heat map: toggled on, it is drawn over the slide from the
    API's per-tile attention; toggled off, it is gone. Also the run on the Benchmarks page."""
    from playwright.sync_api import sync_playwright

    run_id = _mil_run_on(archive)
    failed, console_errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        try:
            page.goto(server + "/login")
            page.get_by_label("User name").fill(USER)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(server + "/")
            page.goto(server + "/benchmarks")
            assert page.locator(f"#mil-runs a[href='/benchmarks/{run_id}']").count() == 1
            page.goto(f"{server}/viewer/{archive['slide'].id}")
            page.wait_for_selector("#osd[data-ready='1']", timeout=30_000)
            assert page.locator("#attention-overlay").count() == 0
            page.get_by_label("Attention heat map").check()
            page.wait_for_selector("#attention[data-state='shown']", timeout=30_000)
            overlay = page.locator("#attention-overlay")
            overlay.wait_for(state="visible")
            box = overlay.bounding_box()
            assert box and box["width"] > 50 and box["height"] > 50
            assert "Predicted label:" in page.locator("#attention-result").inner_text()
            painted = page.evaluate(
                "() => { const c = document.getElementById('attention-overlay'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return [n, c.width * c.height]; }"
            )
            assert painted[0] == archive["slide"].tile_count or painted[0] >= 0.5 * painted[1], painted
            page.wait_for_timeout(800)
            page.screenshot(path=str(test_output / "attention.png"), full_page=True)
            page.get_by_label("Attention heat map").uncheck()
            page.wait_for_selector("#attention[data-state='hidden']")
            assert page.locator("#attention-overlay").count() == 0
        finally:
            browser.close()
    assert not failed, f"requests failed: {failed[:5]}"
    assert not console_errors, console_errors
    assert (test_output / "attention.png").stat().st_size > 10_000
