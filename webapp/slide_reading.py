"""Reading pixels from an open slide (webapp/slide_cache.py's OpenedSlide), bounded in memory
whatever the slide's size: a deep-zoom tile or a thumbnail of a slide without a suitable
pyramid level is not read as one level-0 region (a 15000 x 15000 single-level TIFF cost
+2.7 GB per low-resolution tile), but from a low-resolution overview built once per slide in
bounded blocks, or in bounded blocks itself.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import openslide
from PIL import Image

from engine.errors import NotFound
from engine.slides import flatten_rgba

if TYPE_CHECKING:  # slide_cache imports this module; the open slide is only read here
    from webapp.slide_cache import OpenedSlide

# Deep-zoom tiles of 254 px + 1 px overlap: 256 px images, the layout OpenSeadragon expects.
DZ_TILE_PX = 254
DZ_OVERLAP = 1
# Pixels of a slide level read by one read_region call: 1024 x 1024, 4 MB as RGBA. A deep-zoom
# tile up to 4x coarser than its pyramid level is one read; anything larger goes in blocks of
# this size (or to the overview). Measured on a 12000 x 12000 single-level TIFF: +64 MB peak,
# half of it OpenSlide's own 32 MB tile cache.
READ_MAX_PX = 1_048_576
# Longer side of a slide's low-resolution overview (at most 12 MB as RGB), built once, in
# bounded blocks, for a slide whose pyramid has no level small enough for its thumbnail and
# its coarsest deep-zoom tiles; kept with the open slide.
OVERVIEW_MAX_PX = 2048


@dataclasses.dataclass
class Overview:
    image: Image.Image
    sx: float  # level-0 pixels per overview pixel, across
    sy: float  # ... and down


def fit(w: int, h: int, max_px: int) -> tuple[int, int]:
    """(w, h) scaled down (never up) so that the longer side is at most max_px."""
    scale = max(w, h) / max_px
    if scale <= 1:
        return w, h
    return max(1, round(w / scale)), max(1, round(h / scale))


def _read_blocks(
    slide: openslide.OpenSlide, x: float, y: float, w: float, h: float, out_w: int, out_h: int
) -> Image.Image:
    """The level-0 box (x, y, w, h) as RGB out_w x out_h, read from the coarsest level with
    enough pixels in blocks of at most READ_MAX_PX level pixels, each reduced before the next
    is read: memory does not grow with the box. Outside-scan pixels are white."""
    sx, sy = w / out_w, h / out_h  # level-0 pixels per output pixel
    level = slide.get_best_level_for_downsample(max(sx, sy, 1.0))
    ds = slide.level_downsamples[level]
    side = math.isqrt(READ_MAX_PX)
    bw_max = max(1, int(side * ds / sx))  # output pixels per block, across and down
    bh_max = max(1, int(side * ds / sy))
    out = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    for oy in range(0, out_h, bh_max):
        bh = min(bh_max, out_h - oy)
        for ox in range(0, out_w, bw_max):
            bw = min(bw_max, out_w - ox)
            size = (max(1, min(side, math.ceil(bw * sx / ds))), max(1, min(side, math.ceil(bh * sy / ds))))
            block = flatten_rgba(slide.read_region((int(x + ox * sx), int(y + oy * sy)), level, size))
            out.paste(block.resize((bw, bh), Image.Resampling.BOX) if block.size != (bw, bh) else block, (ox, oy))
    return out


def _read_direct(
    slide: openslide.OpenSlide, x: float, y: float, w: float, h: float, out_w: int, out_h: int
) -> Image.Image | None:
    """The box from the coarsest level with enough pixels, in one read when that read is at
    most READ_MAX_PX; None when it would be larger."""
    level = slide.get_best_level_for_downsample(max(w / out_w, h / out_h, 1.0))
    ds = slide.level_downsamples[level]
    size = (max(1, math.ceil(w / ds)), max(1, math.ceil(h / ds)))
    if size[0] * size[1] > READ_MAX_PX:
        return None
    rgb = flatten_rgba(slide.read_region((int(x), int(y)), level, size))
    return rgb if rgb.size == (out_w, out_h) else rgb.resize((out_w, out_h), Image.Resampling.LANCZOS)


def overview_of(opened: OpenedSlide) -> Overview:
    """The slide at most OVERVIEW_MAX_PX on its longer side, built once per open slide
    (under its own lock, so concurrent tile requests wait for one build, not start
    several), read in bounded blocks."""
    with opened.overview_lock:
        if opened.overview is None:
            slide = opened.slide
            width, height = slide.dimensions
            out_w, out_h = fit(width, height, OVERVIEW_MAX_PX)
            image = _read_direct(slide, 0, 0, width, height, out_w, out_h)
            if image is None:
                image = _read_blocks(slide, 0, 0, width, height, out_w, out_h)
            opened.overview = Overview(image, width / out_w, height / out_h)
        return opened.overview


def read_scaled(opened: OpenedSlide, x: int, y: int, w: int, h: int, out_w: int, out_h: int) -> Image.Image:
    """The level-0 box (x, y, w, h) as RGB out_w x out_h (outside-scan pixels white):
    in one read from the pyramid when that is small; else from the overview when it is
    fine enough; else in bounded blocks (a level-0 region a tile covers)."""
    slide = opened.slide
    image = _read_direct(slide, x, y, w, h, out_w, out_h)
    if image is not None:
        return image
    overview = overview_of(opened)
    if overview.sx <= w / out_w * 1.001 and overview.sy <= h / out_h * 1.001:
        return _from_overview(overview, slide.dimensions, x, y, w, h, out_w, out_h)
    return _read_blocks(slide, x, y, w, h, out_w, out_h)


def deepzoom_tile_box(
    opened: OpenedSlide, level: int, col: int, row: int
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Deep-zoom tile (level, col, row) with the geometry of openslide's
    DeepZoomGenerator (limit_bounds=False: level L is level 0 downsampled by
    2^(levels-1-L); tiles of DZ_TILE_PX plus DZ_OVERLAP on inner edges), read bounded."""
    dz = opened.deepzoom
    if not 0 <= level < dz.level_count:
        raise NotFound(f"deep-zoom level {level} does not exist (0..{dz.level_count - 1})")
    cols, rows = dz.level_tiles[level]
    if not (0 <= col < cols and 0 <= row < rows):
        raise NotFound(f"deep-zoom tile {col}_{row} is outside level {level} ({cols} x {rows} tiles)")
    z_w, z_h = dz.level_dimensions[level]
    ds = 2 ** (dz.level_count - 1 - level)

    def span(t: int, n: int, z_lim: int) -> tuple[int, int]:
        before = DZ_OVERLAP if t else 0
        after = DZ_OVERLAP if t < n - 1 else 0
        return DZ_TILE_PX * t - before, min(DZ_TILE_PX, z_lim - DZ_TILE_PX * t) + before + after

    zx, zw = span(col, cols, z_w)
    zy, zh = span(row, rows, z_h)
    return (zx * ds, zy * ds, zw * ds, zh * ds), (zw, zh)


def _from_overview(
    overview: Overview, dims: tuple[int, int], x: float, y: float, w: float, h: float, out_w: int, out_h: int
) -> Image.Image:
    """The level-0 box from the overview; the part beyond the slide's edge (deep-zoom tiles
    at the border reach past it) is white, as read_region gives it."""
    width, height = dims
    cw, ch = min(w, width - x), min(h, height - y)  # the part of the box inside the slide
    out = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    pw, ph = round(out_w * cw / w), round(out_h * ch / h)
    if cw <= 0 or ch <= 0 or pw < 1 or ph < 1:
        return out
    box = (
        x / overview.sx,
        y / overview.sy,
        min(overview.image.width, (x + cw) / overview.sx),
        min(overview.image.height, (y + ch) / overview.sy),
    )
    out.paste(overview.image.resize((pw, ph), Image.Resampling.LANCZOS, box=box), (0, 0))
    return out
