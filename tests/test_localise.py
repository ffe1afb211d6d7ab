"""Pixel-level placement of a region in a slide (engine.search.localise): a rotated/mirrored,
rescaled, JPEG-compressed copy of part of a slide is put back on its box in each of the 8
transforms; a region from another image is refused; and search results carry the pixel
box first, or the feature boxes alone when the slide file cannot be read at query time."""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from engine.search import SearchEngine
from engine.search.localise import ACCEPT_NCC, cached_view, register_region, view_cache
from engine.search.ncc import Matcher, coarse_peaks, transform, turn_margins, uniform_margins
from engine.slides import open_slide
from engine.tissue import tissue_mask_rgb
from tests.indexed_archive import make_indexed_archive
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff

TRANSFORMS = [(turns, mirrored) for mirrored in (False, True) for turns in range(4)]


def transformed(crop: Image.Image, turns: int, mirrored: bool, scale: float = 1.0, quality: int = 70) -> Image.Image:
    """The crop rotated counter-clockwise by 90 degrees `turns` times, then mirrored
    left-right, rescaled and saved as JPEG: what a screenshot of a turned view might be."""
    for _ in range(turns):
        crop = crop.transpose(Image.Transpose.ROTATE_90)
    if mirrored:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if scale != 1.0:
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def undoing(turns: int, mirrored: bool) -> tuple[int, bool]:
    """The (turns, mirrored) of engine.search.localise (mirror first, then rot90 counter-clockwise)
    that maps a region made by `transformed(crop, turns, mirrored)` back onto the crop."""
    return (4 - turns) % 4, mirrored


def nuclei_slide(height: int, width: int, seed: int) -> np.ndarray:
    """tissue_blobs with dark 'nuclei' in the tissue (the brightest spots of blurred noise:
    blobs of 2 - 4 um at 0.5 um/px): texture at the scale real tissue has, which survives
    JPEG and resampling, unlike per-pixel noise."""
    from PIL import ImageFilter

    rgb = tissue_blobs(height, width, seed=seed, n_blobs=3, radius=(0.2, 0.3))
    rng = np.random.default_rng(seed + 1000)
    noise = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
    blurred = np.asarray(noise)
    nuclei = (blurred > np.percentile(blurred, 92)) & (rgb.min(axis=2) < 200)
    rgb[nuclei] = (np.array([80, 40, 120]) + rng.integers(0, 30, (int(nuclei.sum()), 3))).astype(np.uint8)
    return rgb


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("localise")
    a = write_pyramidal_tiff(tmp / "nuclei-a.tiff", nuclei_slide(2000, 2400, seed=5), mpp=0.5)
    b = write_pyramidal_tiff(tmp / "nuclei-b.tiff", nuclei_slide(2000, 2400, seed=6), mpp=0.5)
    return tmp, a, b


def test_ncc_by_fft_is_the_direct_ncc():
    """The FFT + summed-area-table NCC equals NCC computed window by window, and the
    coarse search finds a turned, mirrored, brightened copy of a piece of the image."""
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 200, (37, 53)).astype(np.float32)
    template = rng.uniform(0, 200, (7, 11)).astype(np.float32)
    got = Matcher(image).ncc(template)
    t = template - template.mean()
    want = np.empty((37 - 7 + 1, 53 - 11 + 1))
    for i in range(want.shape[0]):
        for j in range(want.shape[1]):
            w = image[i : i + 7, j : j + 11] - image[i : i + 7, j : j + 11].mean()
            want[i, j] = (t * w).sum() / np.sqrt((t * t).sum() * (w * w).sum())
    np.testing.assert_allclose(got, want, atol=1e-4)
    piece = image[12:24, 30:45]
    region = np.ascontiguousarray(1.5 * np.rot90(piece, 1)[::-1] + 20)  # turned, flipped, brighter
    ncc, row, col, turns, mirrored = coarse_peaks(image, region)[0]
    assert ncc > 0.999 and (round(row), round(col)) == (12, 30)
    # the reported transform (mirror, then rot90 `turns` times) maps the region back
    np.testing.assert_allclose(transform(region, turns, mirrored), 1.5 * piece + 20, rtol=1e-5)


def test_turn_margins_follow_thetransform():
    """The margins of a transformed image are the transformed margins (checked on a mask)."""
    h, w, margins = 7, 11, (1, 2, 3, 4)  # top, right, bottom, left
    mask = np.zeros((h, w), bool)
    mask[1 : h - 3, 4 : w - 2] = True
    for turns, mirrored in TRANSFORMS:
        m = transform(mask, turns, mirrored)
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        found = (rows[0], m.shape[1] - 1 - cols[-1], m.shape[0] - 1 - rows[-1], cols[0])
        assert turn_margins(margins, turns, mirrored) == found, (turns, mirrored)


def test_uniform_margins_are_the_flat_bands_only():
    rng = np.random.default_rng(0)
    g = rng.uniform(0, 200, (50, 60)).astype(np.float32)
    g[:, :3] = 0  # white glass on the left
    assert uniform_margins(g) == (0, 0, 0, 3)
    g[:5] = 255  # black bands above and on the right, meeting at a corner (grey 255)
    g[:, -7:] = 255
    assert uniform_margins(g) == (5, 7, 0, 3)
    assert uniform_margins(np.zeros((16, 24), np.float32)) == (6, 9, 6, 9)  # at most 3/8 of a side


def test_view_cache_reuses_and_evicts(synthetic):
    _, a, b = synthetic
    built = []
    cache = view_cache(maxsize=1)

    def build(tag):
        return lambda: built.append(tag) or tag

    assert cached_view(cache, a, 4.0, build("a")) == "a" and cached_view(cache, a, 4.0, build("a2")) == "a"
    assert cached_view(cache, a, 2.0, build("a@2")) == "a@2"  # another resolution: another view
    assert cached_view(cache, b, 4.0, build("b")) == "b"  # evicts a
    assert cached_view(cache, a, 4.0, build("a3")) == "a3"
    os.utime(a, ns=(0, 1))  # the file replaced (another mtime): read again
    assert cached_view(cache, a, 4.0, build("a4")) == "a4"
    assert built == ["a", "a@2", "b", "a3", "a4"]


@pytest.mark.parametrize("turns,mirrored", TRANSFORMS)
def test_synthetic_copy_is_placed_in_eachtransform(synthetic, turns, mirrored):
    _, a, _ = synthetic
    slide = open_slide(a)
    try:
        x, y, w, h = 1133, 757, 700, 500  # off any grid, not square: odd turns swap its sides
        crop = slide.read_region((x, y), 0, (w, h)).convert("RGB")
        assert tissue_mask_rgb(np.asarray(crop)).mean() > 0.5
        placed = register_region(slide, 0.5, transformed(crop, turns, mirrored, scale=1.1), 0.5 / 1.1)
    finally:
        slide.close()
    assert placed is not None
    assert (placed.turns, placed.mirrored) == undoing(turns, mirrored)
    assert abs(placed.x - x) <= 4 and abs(placed.y - y) <= 4
    assert abs(placed.w - w) <= 2 and abs(placed.h - h) <= 2
    assert placed.ncc >= ACCEPT_NCC


def test_synthetic_refusals_and_edges(synthetic):
    _, a, b = synthetic
    slide_a, slide_b = open_slide(a), open_slide(b)
    try:
        crop_b = slide_b.read_region((900, 800), 0, (600, 600)).convert("RGB")
        assert tissue_mask_rgb(np.asarray(crop_b)).mean() > 0.5
        # a region of another slide: the best wrong place is far below the threshold
        wrong = register_region(slide_a, 0.5, transformed(crop_b, 1, False), 0.5, min_ncc=-1.0)
        assert wrong is None or wrong.ncc < ACCEPT_NCC - 0.2
        assert register_region(slide_a, 0.5, transformed(crop_b, 1, False), 0.5) is None
        assert register_region(slide_b, 0.5, transformed(crop_b, 1, False), 0.5) is not None  # control
        # blank glass has nothing to match
        assert register_region(slide_a, 0.5, Image.new("RGB", (500, 500), (240, 240, 240)), 0.5) is None
        # a crop reaching past the slide's bottom edge, where tissue reaches it: OpenSlide
        # gives transparent (black once converted) pixels beyond, a flat band cut off for
        # matching; the box is the crop's, partly outside the slide
        x, y = 1350, slide_a.dimensions[1] - 400
        edge = slide_a.read_region((x, y), 0, (600, 600)).convert("RGB")
        assert tissue_mask_rgb(np.asarray(edge)[:400]).mean() > 0.4 and np.asarray(edge)[400:].max() == 0
        placed = register_region(slide_a, 0.5, transformed(edge, 2, True), 0.5)
        assert (
            placed is not None
            and abs(placed.x - x) <= 4
            and abs(placed.y - y) <= 4
            and (placed.w, placed.h) == (600, 600)
        )
    finally:
        slide_a.close()
        slide_b.close()


REAL = "CMU-1-Small-Region.svs"
REAL_MPP = 0.499


@pytest.fixture(scope="module")
def real_slide(shared_data):
    slide = open_slide(shared_data / "slides" / "real" / REAL)
    yield slide, view_cache(), shared_data / "slides" / "real" / REAL
    slide.close()


@pytest.mark.parametrize("turns,mirrored", TRANSFORMS)
def test_real_copy_is_placed_in_eachtransform(real_slide, turns, mirrored):
    """An off-grid crop of a real slide (448 x 300 um), turned/mirrored, rescaled by 0.9 and
    JPEG q70-compressed, lands within a few pixels of its box (a tile here is 449 px)."""
    slide, views, path = real_slide
    x, y, w, h = 757, 1211, 898, 600
    crop = slide.read_region((x, y), 0, (w, h)).convert("RGB")
    assert tissue_mask_rgb(np.asarray(crop)).mean() > 0.5
    placed = register_region(
        slide, REAL_MPP, transformed(crop, turns, mirrored, scale=0.9), REAL_MPP / 0.9, views=views, path=path
    )
    assert placed is not None
    assert (placed.turns, placed.mirrored) == undoing(turns, mirrored)
    assert abs(placed.x - x) <= 8 and abs(placed.y - y) <= 8  # < 2 % of a tile
    assert abs(placed.w - w) <= 2 and abs(placed.h - h) <= 2


def test_regions_of_other_images_are_refused(real_slide, shared_data):
    """Real H&E that is not in this slide: a TCGA region (tiatoolbox) and a crop of the TCGA
    frozen section. Their best places score far below the threshold, and are refused."""
    slide, views, path = real_slide
    other = Image.open(shared_data / "images" / "tiatoolbox" / "TCGA-HE-7130-01Z-00-DX1.png").convert("RGB")
    tcga = open_slide(shared_data / "slides" / "real" / "tcga-cr-7395-01a-01-ts1.svs")
    try:
        frozen = tcga.read_region((1500, 1400), 0, (896, 896)).convert("RGB")
    finally:
        tcga.close()
    for region in (other.crop((100, 200, 900, 800)), frozen):
        assert tissue_mask_rgb(np.asarray(region)).mean() > 0.5
        query = transformed(region, 1, True)
        best = register_region(slide, REAL_MPP, query, 0.5, views=views, path=path, min_ncc=-1.0)
        assert best is None or best.ncc < ACCEPT_NCC - 0.2
        assert register_region(slide, REAL_MPP, query, 0.5, views=views, path=path) is None


@pytest.fixture(scope="module")
def nuclei_archive(synthetic):
    """The two synthetic slides indexed (random ResNet-18), and a perturbed crop of the first."""
    tmp, a, b = synthetic
    settings = make_indexed_archive(tmp / "archive", [a, b], min_tissue=0.5)
    slide = open_slide(a)
    x, y = 1133, 757
    crop = slide.read_region((x, y), 0, (900, 900)).convert("RGB")
    slide.close()
    return settings, tmp / "archive" / "archive" / "nuclei-a.tiff", transformed(crop, 3, False), (x, y)


def test_search_puts_the_pixel_box_first_unless_the_slide_is_unreadable(nuclei_archive):
    """Through SearchEngine.search_region: the pixel box comes first and says so; when the
    slide file is gone or damaged at query time, the result has the feature boxes only."""
    settings, archived, query, (x, y) = nuclei_archive
    engine = SearchEngine(settings)
    target = archived.resolve()
    try:
        result = engine.search_region(query, mpp=0.5, top_k=2).to_json()
        top = result["results"][0]
        assert top["slide"]["path"].endswith("nuclei-a.tiff")
        first = top["regions"][0]
        assert (
            first["match"] == "pixels"
            and abs(first["x"] - x) <= 4
            and abs(first["y"] - y) <= 4
            and first["score"] >= ACCEPT_NCC
        )
        assert {r["match"] for r in top["regions"][1:]} == {"features"}
        assert "pixels" not in {r["match"] for r in result["results"][1]["regions"]}  # the other slide
        assert result["timing_ms"]["refine"] > 0
        archived.unlink()
        for damage in (None, b"not a slide"):
            if damage is not None:
                archived.write_bytes(damage)
            top = engine.search_region(query, mpp=0.5, top_k=2).to_json()["results"][0]
            assert top["slide"]["path"].endswith("nuclei-a.tiff")
            assert top["regions"] and {r["match"] for r in top["regions"]} == {"features"}
    finally:
        archived.unlink(missing_ok=True)
        archived.symlink_to(target)
        engine.catalog.dispose()


def test_results_page_and_viewer_show_the_pixel_match(nuclei_archive, tmp_path):
    from webapp import create_app, users

    settings, _, query, _ = nuclei_archive
    app = create_app({"TESTING": True, "SETTINGS": settings, "INSTANCE_PATH": str(tmp_path / "instance")})
    try:
        users.create_user(app.extensions["histoseek"].catalog, "path", "localise pw")
        client = app.test_client()
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
        assert (
            client.post("/login", data={"username": "path", "password": "localise pw", "csrf_token": token}).status_code
            == 302
        )
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/account").text).group(1)
        buf = io.BytesIO()
        query.save(buf, "PNG")
        form = {"image": (io.BytesIO(buf.getvalue()), "crop.png"), "mpp": "0.5", "top_k": "2", "csrf_token": token}
        page = client.post("/search/region", data=form, content_type="multipart/form-data")
        assert page.status_code == 200
        assert page.text.count('class="pixel-match-caption"') == 1  # the source slide's first region only
        link = (
            re.search(r'<a class="slide-link" href="([^"]+)">nuclei-a.tiff</a>', page.text)
            .group(1)
            .replace("&amp;", "&")
        )
        viewer = client.get(link)
        boxes = json.loads(
            re.search(r'<script type="application/json" id="viewer-boxes">(.*?)</script>', viewer.text, re.S).group(1)
        )
        assert boxes[0]["match"] == "pixels" and {b["match"] for b in boxes[1:]} == {"features"}
        assert "exact copy of the query" in viewer.text
        assert client.get(link.split("?")[0] + "?box=1,2,3,4,0.5,guess").status_code == 400
    finally:
        app.extensions["histoseek"].catalog.dispose()
