"""Tissue masks: which pixels of a slide (or of any RGB region) show stained tissue.

Brightfield glass is grey: it passes red, green and blue alike. Every stain absorbs green
more than red or blue (haematoxylin and eosin both, DAB too), however pale the tissue, so
the mask is an absolute threshold on the stain excess max(R, B) - G, smoothed, measured
from the glass's own tint when the image shows glass. No Otsu split: an all-tissue field
(pale stroma, mucin, loose connective tissue) has no glass to split from and stays whole,
an all-glass field stays empty. Dark grey pixels (slide edges, folds, dust) and pen ink are
removed, small specks dropped and small holes filled. Pen ink is recognised by colour and
texture: green/blue ink has no stain excess or the wrong hue, black ink is brown-black, red
ink is a smooth film where deep eosin has texture.
"""

from __future__ import annotations

import numpy as np
import openslide
from scipy import ndimage as ndi
from skimage import morphology

# Stain excess (max(R, B) - G, smoothed) above which a pixel is stained: glass is 0 +- 2.
STAIN_MIN = 4.5
# ... and the 3 x 3 excess above this, which puts a tissue edge back where it is.
EDGE_MIN = 2.0
# Glass: every channel at least this bright, tinted (stain excess) by at most this much.
GLASS_MIN_LEVEL = 215
GLASS_TINT_MAX = 5.5
# Dark pixels below this saturation are grey/black (edges, folds, dust), not tissue.
DARK_GREY_SAT = 0.3
# Red-hued pixels smoother than this (grey levels, 7 x 7 standard deviation) are red ink.
RED_INK_STD = 6.0
# Darker than this (HSV value) and grey (DARK_GREY_SAT) is a slide edge, a fold or black ink.
DARK_VALUE = 0.25
# Longest side of the thumbnail a slide mask is computed from.
MASK_MAX_PX = 2048


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hue, saturation, value), each H x W float32 in 0..1, of a uint8 RGB image; the same
    as skimage.color.rgb2hsv but in float32 and several times faster on thumbnails."""
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    delta = mx - mn
    v = mx * np.float32(1 / 255.0)
    s = delta / np.maximum(mx, np.float32(1e-6))
    inv = np.float32(1.0) / np.maximum(delta, np.float32(1e-6))
    h = np.where(
        mx == r, (g - b) * inv, np.where(mx == g, (b - r) * inv + np.float32(2.0), (r - g) * inv + np.float32(4.0))
    )
    h = np.where(h < 0, h + np.float32(6.0), h)
    h *= np.float32(1 / 6.0)
    h[delta == 0] = 0.0
    return h, s, v


def pen_mask_rgb(rgb: np.ndarray, hsv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Pixels of marker ink (green, blue, black, red) in an H x W x 3 uint8 image."""
    h, s, v = rgb_to_hsv(rgb) if hsv is None else hsv
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    green_cyan = (h > 0.2) & (h < 0.56) & (s > 0.15)
    # Blue ink has red at or below green; over-stained haematoxylin is violet (red well above
    # green), so it stays tissue.
    blue = (b - r > 60) & (b - g > 30) & (s > 0.3) & (4 * (r - g) <= b - g)
    black_brown = (v < 0.5) & (h > 0.04) & (h < 0.2) & (s > 0.15)
    # Red ink and deep eosin (orange-red stroma, blood) share a hue; ink is a smooth film,
    # stained tissue has texture (nuclei, fibres) at every scale the mask runs at.
    red = ((h > 0.95) | (h < 0.04)) & (s > 0.1) & (_local_std(v) < RED_INK_STD)
    return green_cyan | blue | black_brown | red


def _local_std(x: np.ndarray, size: int = 7) -> np.ndarray:
    """Standard deviation of x (0..1) in a size x size window, in 0..255 grey levels."""
    x = x.astype(np.float32) * 255.0
    mean = ndi.uniform_filter(x, size, mode="nearest")
    mean_sq = ndi.uniform_filter(x * x, size, mode="nearest")
    return np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))


def stain_excess(rgb: np.ndarray, smooth: int = 5) -> np.ndarray:
    """H x W float32: max(red, blue) - green, box-smoothed over smooth x smooth pixels.

    Every brightfield stain (haematoxylin, eosin, DAB) absorbs green more than red or blue,
    however pale the tissue; glass is grey, so it sits at 0 +- a few levels of noise."""
    x = rgb.astype(np.float32)
    if smooth > 1:
        x = ndi.uniform_filter(x, size=(smooth, smooth, 1), mode="nearest")
    return np.maximum(x[..., 0], x[..., 2]) - x[..., 1]


def glass_excess(rgb: np.ndarray, excess: np.ndarray) -> float:
    """The stain excess of this image's glass: scanners tint glass by a few levels. Taken
    from the bright, near-neutral pixels when they are a real share of the image; an
    all-tissue field has no such mode (its brightest pixels are pale tissue, well above
    GLASS_TINT_MAX), and then glass is taken as neutral."""
    darkest = rgb.min(axis=2)
    # Pure white (>= 254) is a scanner's padding outside the scanned area, not glass.
    bright = (darkest >= GLASS_MIN_LEVEL) & (darkest < 254)
    if bright.mean() < 0.05:
        return 0.0
    tint = float(np.median(excess[bright]))
    return tint if 0.0 <= tint <= GLASS_TINT_MAX else 0.0


def tissue_mask_rgb(rgb: np.ndarray, *, remove_pen: bool = True) -> np.ndarray:
    """Boolean H x W mask of tissue in an H x W x 3 uint8 image (a slide thumbnail or an
    uploaded region). Works at any scale: morphology sizes follow the image size."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"need an H x W x 3 RGB array, got shape {rgb.shape}")
    rgb = np.ascontiguousarray(rgb[..., :3]).astype(np.uint8, copy=False)
    hsv = rgb_to_hsv(rgb)
    sat, val = hsv[1], hsv[2]
    smooth = 9 if min(rgb.shape[:2]) >= 64 else 3
    excess = stain_excess(rgb, smooth)
    glass = glass_excess(rgb, excess)
    # Smoothed over 9 x 9 the excess is clear of glass noise but bleeds a few pixels past
    # a tissue edge; the 3 x 3 excess puts the edge back where it is.
    mask = (excess > glass + STAIN_MIN) & (stain_excess(rgb, 3) > glass + EDGE_MIN)
    # Dark and grey: a slide edge, a fold's shadow, dust, black ink; dark *and* coloured
    # (packed lymphocytes) stays tissue.
    mask &= ~((val < DARK_VALUE) & (sat < DARK_GREY_SAT))
    area = mask.size
    mask = morphology.remove_small_holes(mask, max_size=max(4, int(area * 1e-3)))
    if remove_pen:
        # Ink goes after hole filling: a stroke across tissue is no hole to fill.
        mask &= ~pen_mask_rgb(rgb, hsv)
    mask = morphology.remove_small_objects(mask, max_size=max(4, int(area * 1e-4)))
    return mask


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
