"""Tissue masks: which pixels of a slide (or of any RGB region) show stained tissue.

Brightfield glass is bright and grey; stained tissue is coloured. So the mask is Otsu's
threshold on HSV saturation, kept inside a band so that an all-glass or an all-tissue image
is not split in two, with very dark pixels (slide edges, folds) and pen ink removed, small
specks dropped and small holes filled. Pen ink is recognised by colour: H&E (and DAB) never
reach the green/blue hues of markers, nor the brown-black of black ink, nor the deep
low-blue red of red ink.
"""

from __future__ import annotations


import numpy as np
import openslide
from skimage import filters, morphology


# Saturation threshold band: glass scans sit below ~0.05, faint eosin rarely below ~0.08.
SAT_MIN, SAT_MAX = 0.05, 0.15
# Darker than this (HSV value) is a slide edge, a fold or black ink, never useful tissue.
DARK_VALUE = 0.25
# Longest side of the thumbnail a slide mask is computed from.
MASK_MAX_PX = 2048


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hue, saturation, value), each H x W float32 in 0..1, of a uint8 RGB image; the same
    as skimage.color.rgb2hsv but in float32 and several times faster on thumbnails."""
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(axis=2), x.min(axis=2)
    delta = mx - mn
    v = mx / 255.0
    s = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0.0).astype(np.float32)
    safe = np.maximum(delta, 1e-6)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(delta > 0, h / 6.0, 0.0).astype(np.float32)
    return h, s, v


def pen_mask_rgb(rgb: np.ndarray, hsv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Pixels of marker ink (green, blue, black, red) in an H x W x 3 uint8 image."""
    h, s, v = rgb_to_hsv(rgb) if hsv is None else hsv
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    green_cyan = (h > 0.2) & (h < 0.56) & (s > 0.15)
    blue = (b - r > 60) & (b - g > 30) & (s > 0.3)
    black_brown = (v < 0.5) & (h > 0.04) & (h < 0.2) & (s > 0.15)
    # Strong eosin reaches (200, 90, 130): only deeper reds than that count as red ink, so
    # a faint red stroke stays in the mask rather than real tissue being thrown out.
    red = ((h > 0.9) | (h < 0.03)) & (r > 150) & (g < 65) & (b < 95)
    return green_cyan | blue | black_brown | red


def tissue_mask_rgb(rgb: np.ndarray, *, remove_pen: bool = True) -> np.ndarray:
    """Boolean H x W mask of tissue in an H x W x 3 uint8 image (a slide thumbnail or an
    uploaded region). Works at any scale: morphology sizes follow the image size."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"need an H x W x 3 RGB array, got shape {rgb.shape}")
    rgb = np.ascontiguousarray(rgb[..., :3]).astype(np.uint8, copy=False)
    hsv = rgb_to_hsv(rgb)
    sat, val = hsv[1], hsv[2]
    if float(sat.max()) - float(sat.min()) < 1e-3:
        thresh = SAT_MIN
    else:
        thresh = float(np.clip(filters.threshold_otsu(sat), SAT_MIN, SAT_MAX))
    mask = (sat > thresh) & (val > DARK_VALUE)
    # Specks and holes are judged relative to the image: a 0.01 % island is dust, a hole
    # below 0.1 % is a nucleus-sized gap in a thumbnail, not real background.
    area = mask.size
    mask = morphology.remove_small_holes(mask, max_size=max(4, int(area * 1e-3)))
    if remove_pen:
        # Ink goes after hole filling: a stroke across tissue is no hole to fill.
        mask &= ~pen_mask_rgb(rgb, hsv)
    return morphology.remove_small_objects(mask, max_size=max(4, int(area * 1e-4)))


def slide_thumbnail(slide: openslide.OpenSlide, max_px: int = MASK_MAX_PX) -> tuple[np.ndarray, float]:
    """(RGB array, downsample) of a low-resolution view of the whole slide: the pyramid's
    coarsest level that is still at least max_px/2 on its longer side, resized to max_px
    at most. downsample = level-0 pixels per thumbnail pixel."""
    width, height = slide.dimensions
    scale = max(1.0, max(width, height) / max_px)
    thumb = slide.get_thumbnail((max(1, int(width / scale)), max(1, int(height / scale))))
    rgb = np.asarray(thumb.convert("RGB"))
    downsample = max(width / rgb.shape[1], height / rgb.shape[0])
    return rgb, float(downsample)


def slide_tissue_mask(slide: openslide.OpenSlide) -> tuple[np.ndarray, float]:
    """(tissue mask bool, downsample float) from a low-resolution view of the slide;
    downsample = level-0 pixels per mask pixel."""
    rgb, downsample = slide_thumbnail(slide)
    return tissue_mask_rgb(rgb), downsample
