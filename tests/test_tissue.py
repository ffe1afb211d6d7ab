"""Tissue masks on synthetic images, real H&E regions and real pen-marked thumbnails."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from PIL import Image

from engine.tissue import pen_mask_rgb, slide_tissue_mask, tissue_mask_rgb
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff


def _ellipse(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 <= 1


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(235 + rng.normal(0, 3, (300, 400, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask_rgb(glass).sum() == 0
    assert tissue_mask_rgb(np.full((50, 50, 3), 255, np.uint8)).sum() == 0


def test_stained_blob_is_found_and_holes_filled():
    rng = np.random.default_rng(1)
    rgb = np.full((400, 600, 3), 238, np.uint8)
    blob = _ellipse(400, 600)
    rgb[blob] = np.clip(np.array([190, 100, 160]) + rng.integers(-30, 30, (blob.sum(), 3)), 0, 255)
    rgb[200:203, 300:303] = 238  # a nucleus-sized gap inside the tissue
    mask = tissue_mask_rgb(rgb)
    iou = (mask & blob).sum() / (mask | blob).sum()
    assert iou > 0.97
    assert mask[201, 301]


def test_all_tissue_region_is_not_split_in_two():
    rng = np.random.default_rng(2)
    rgb = np.clip(np.array([180, 90, 150]) + rng.integers(-50, 50, (224, 224, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask_rgb(rgb).mean() > 0.95


def test_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        tissue_mask_rgb(np.zeros((10, 10), np.uint8))


@pytest.mark.parametrize("colour", ["black", "green"])
def test_pen_marks_are_not_tissue(shared_data, colour):
    folder = shared_data / "images" / "histoqc" / "pen"
    rgb = np.asarray(Image.open(folder / f"pen_{colour}.png").convert("RGB"))
    pen = np.asarray(Image.open(folder / f"pen_{colour}_mask.png")) > 0
    without = tissue_mask_rgb(rgb, remove_pen=False)
    mask = tissue_mask_rgb(rgb)
    assert (without & pen).sum() / pen.sum() > 0.1  # saturation alone takes ink for tissue
    assert (mask & pen).sum() / pen.sum() < 0.02


def test_pen_rejection_keeps_real_he_tissue(shared_data):
    images = sorted((shared_data / "images" / "histoqc" / "templates").glob("*.png"))
    images.append(shared_data / "images" / "tiatoolbox" / "TCGA-HE-7130-01Z-00-DX1.png")
    for path in images:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        without = tissue_mask_rgb(rgb, remove_pen=False)
        kept = (tissue_mask_rgb(rgb) & without).sum() / without.sum()
        assert kept > 0.97, path.name
        assert pen_mask_rgb(rgb).mean() < 0.01, path.name


def test_slide_mask_is_aligned_with_level0(tmp_path):
    rgb = tissue_blobs(1600, 2400, seed=3)
    path = write_pyramidal_tiff(tmp_path / "s.tiff", rgb, mpp=0.5)
    slide = openslide.OpenSlide(str(path))
    mask, downsample = slide_tissue_mask(slide)
    slide.close()
    assert downsample == pytest.approx(2400 / mask.shape[1], rel=0.01)
    truth = np.asarray(Image.fromarray(tissue_mask_rgb(rgb)).resize(mask.shape[::-1], Image.Resampling.NEAREST))
    assert (mask == truth).mean() > 0.97
