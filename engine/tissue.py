"""Tissue masks: which pixels of a slide (or of any RGB region) show stained tissue.

Brightfield glass is grey: it passes red, green and blue alike. Every stain absorbs green
more than red or blue (haematoxylin and eosin both, DAB too), however pale the tissue, so
the mask is an absolute threshold on the stain excess max(R, B) - G, smoothed, measured
from the glass's own tint when the image shows glass. No Otsu split: an all-tissue field
(pale stroma, mucin, loose connective tissue) has no glass to split from and stays whole,
an all-glass field stays empty. Dark grey pixels (slide edges, folds, dust) and pen ink are
removed, small specks dropped and small holes filled. Pen ink is recognised by colour and
texture: green/blue ink has no stain excess or the wrong hue, black ink is brown-black, red
ink is a smooth film where deep eosin has texture, and a blurred (out-of-focus) stroke is a
dark maroon core without texture at any scale plus the smooth pale halo around it.

Fat is tissue: its vacuoles are as clear as glass. When the image's resolution (mpp) is
known, a glass-coloured space no larger than a fat cell that tissue walls in (wholly, or
with thin septa where the image's edge cuts it) is tissue; open glass beside a solid tissue
edge stays background.
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
# Blurred ink: green-channel texture (mean |pixel - its 3 x 3 mean| over TEXTURE_PX x
# TEXTURE_PX, grey levels) below INK_TEXTURE_MAX. Tissue has nuclei, fibres and edges in a
# window this wide; nuclei interiors are smooth over 7 px but not over 15 (at 7 px the
# Kather lymphocyte and mucosa patches lost up to 6 % of their tissue to it).
TEXTURE_PX = 15
INK_TEXTURE_MAX = 0.6
# ... and a blurred stroke's core is dark and purple-to-red (maroon): HSV value and saturation.
INK_CORE_VALUE = 0.5
INK_CORE_SAT = 0.2
# Fat: adipocytes are 50-150 um across; a glass space up to the largest is a vacuole candidate.
FAT_CELL_UM = 150.0
# A candidate cut by the image's edge is fat when tissue walls at least this share of its
# outline (the rest is the image's edge) ...
FAT_WALL_MIN = 0.3
# ... at most this share of that wall is thick tissue: thicker than 2 x SEPTUM_UM, the solid
# edge of a tumour sheet or stroma, not the septa between fat cells ...
SEPTUM_UM = 12.0
FAT_THICK_WALL_MAX = 0.4
# ... its wall band (tissue within SEPTUM_UM) is pale, mean HSV value at least this: septa
# are pale eosin, a tumour sheet's edge is dark with nuclei (../shared/data: the adipose
# patches' septa 0.77-0.89, the tumour strip of TUM-AACHEHDV 0.61) ...
FAT_SEPTUM_VALUE = 0.7
# ... and the field holds at least this share of tissue: glass with a corner of ragged tissue
# or a few specks has too few walls to tell a fat cell from open glass (fat fields: >= 20 %).
FAT_FIELD_MIN = 0.1
# Septa are measured on a grid coarse enough to keep SEPTUM_UM at least this many pixels.
SEPTUM_MIN_PX = 12


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


def pen_mask_rgb(
    rgb: np.ndarray, hsv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, tissue: np.ndarray | None = None
) -> np.ndarray:
    """Pixels of marker ink (green, blue, black, red) in an H x W x 3 uint8 image. With
    `tissue` (the stain mask), a blurred red stroke's pale halo is ink too: the smooth parts
    of that mask that touch red or maroon ink."""
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
    # Out of focus, red ink is a maroon film (the hue of H&E, dark like packed nuclei) with no
    # texture over TEXTURE_PX: packed nuclei and deep eosin always have some.
    smooth = _texture(rgb[..., 1]) < INK_TEXTURE_MAX
    red |= smooth & (v < INK_CORE_VALUE) & (s > INK_CORE_SAT) & ((h > 0.75) | (h < 0.04))
    if tissue is not None and (tissue & smooth & red).any():
        # Its halo fades to pale pink, as pale stroma does; but stroma has texture, and the
        # halo is one smooth piece with the ink it surrounds.
        pieces, n = ndi.label(tissue & smooth)
        touches = np.zeros(n + 1, bool)
        touches[np.unique(pieces[red & (pieces > 0)])] = True
        touches[0] = False
        red |= touches[pieces]
    return green_cyan | blue | black_brown | red


def _texture(channel: np.ndarray) -> np.ndarray:
    """Mean |pixel - its 3 x 3 mean| over TEXTURE_PX x TEXTURE_PX, in grey levels: fine detail,
    blind to the smooth gradients of a blurred stroke's edge."""
    x = channel.astype(np.float32)
    detail = np.abs(x - ndi.uniform_filter(x, 3, mode="nearest"))
    return ndi.uniform_filter(detail, TEXTURE_PX, mode="nearest")


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


def fill_fat(mask: np.ndarray, mpp: float, value: np.ndarray | None = None) -> np.ndarray:
    """The mask with fat vacuoles filled: at `mpp` um/px, each glass space no larger than a
    fat cell (FAT_CELL_UM across) that tissue walls in wholly, or that the image's edge cuts
    but thin, pale septa wall in (FAT_WALL_MIN, FAT_THICK_WALL_MAX, FAT_SEPTUM_VALUE; `value`
    is the image's HSV value, 0..1). Open glass is larger than a fat cell, or walled only by
    the image's edge, or by a thick or dark tissue edge (glass beside a tumour sheet), and
    stays background."""
    if not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of um/px, not {mpp!r}")
    max_area = np.pi / 4 * (FAT_CELL_UM / mpp) ** 2
    # Specks of tissue floating in the glass (debris, smaller than a disk SEPTUM_UM across)
    # are no walls: the glass spaces are taken whole.
    speck = int(np.pi * (SEPTUM_UM / 2 / mpp) ** 2)
    glass = ~morphology.remove_small_objects(mask, max_size=speck) if speck >= 1 else ~mask
    spaces, n = ndi.label(glass)
    if n == 0:
        return mask
    area = np.bincount(spaces.ravel(), minlength=n + 1)
    wall = glass & ndi.binary_dilation(~glass)
    frame = np.zeros_like(mask)
    frame[[0, -1], :] = frame[:, [0, -1]] = True
    walled = np.bincount(spaces[wall], minlength=n + 1)
    edge = np.bincount(spaces[frame & glass], minlength=n + 1)
    fill = (area <= max_area) & (walled >= FAT_WALL_MIN * np.maximum(walled + edge, 1))
    fill[0] = False
    cut = fill & (edge > 0)
    r = SEPTUM_UM / mpp
    if cut.any() and (mask.mean() < FAT_FIELD_MIN or r < 1 or value is None):
        fill &= ~cut  # too few walls, or septa below the image's resolution: cannot tell
    elif cut.any():
        fill &= ~cut | _thin_pale_walls(mask, spaces, r, value, n)
    return mask | fill[spaces] if fill.any() else mask


def _thin_pale_walls(mask, spaces, r: float, value: np.ndarray, n: int) -> np.ndarray:
    """Per glass space (fill_fat's n labels): are its tissue walls septa, thin and pale? Thick
    tissue holds a disk of radius r px (an opening, by two distance transforms); the tissue
    within r of a space is its wall band, and its mean value says pale septum or dark sheet.
    Measured on every k-th pixel, k keeping r >= SEPTUM_MIN_PX: the three distance transforms
    are most of fill_fat's cost, and a septum's thickness needs no finer grid."""
    k = max(1, int(r // SEPTUM_MIN_PX))
    mask, spaces, value, r = mask[::k, ::k], spaces[::k, ::k], value[::k, ::k], r / k
    glass = spaces > 0
    wall = glass & ndi.binary_dilation(~glass)
    walled = np.bincount(spaces[wall], minlength=n + 1)
    thick_wall = np.zeros(n + 1)
    core = ndi.distance_transform_edt(mask) > r
    if core.any():
        thick = mask & (ndi.distance_transform_edt(~core) <= r)
        thick_wall = np.bincount(spaces[wall & ndi.binary_dilation(thick)], minlength=n + 1)
    # Each tissue pixel within r of the glass belongs to the band of its nearest space.
    dist, (iy, ix) = ndi.distance_transform_edt(~glass, return_indices=True)
    band = mask & (dist <= r)
    owner = spaces[iy[band], ix[band]]
    count = np.bincount(owner, minlength=n + 1)
    mean_value = np.bincount(owner, weights=value[band], minlength=n + 1) / np.maximum(count, 1)
    thin = thick_wall <= FAT_THICK_WALL_MAX * np.maximum(walled, 1)
    return (walled > 0) & thin & (mean_value >= FAT_SEPTUM_VALUE)


def tissue_mask_rgb(rgb: np.ndarray, *, mpp: float | None = None, remove_pen: bool = True) -> np.ndarray:
    """Boolean H x W mask of tissue in an H x W x 3 uint8 image (a slide thumbnail or an
    uploaded region). Works at any scale: morphology sizes follow the image size. With `mpp`
    (the image's um/px) fat vacuoles are tissue too (fill_fat); without, a glass-clear space
    is tissue only when it is a small hole (0.1 % of the image)."""
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
    stained = morphology.remove_small_holes(mask, max_size=max(4, int(area * 1e-3)))
    mask = stained if mpp is None else fill_fat(stained, mpp, val)
    if remove_pen:
        # Ink goes after hole filling: a stroke across tissue is no hole to fill. An ink halo
        # is sought in the stained pixels only: a filled fat vacuole is smooth too, and a
        # capillary's red cells in its septum are no stroke to spread from.
        mask &= ~pen_mask_rgb(rgb, hsv, tissue=stained)
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
