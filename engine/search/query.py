"""Query tiles: a region image cut into tiles on the index's grid, or the mosaic of a whole
slide (engine.search.mosaic), indexed or a file, and their unit-length features.

Region: the image is cut into a centred grid of squares of one index tile each (at the index's
microns per pixel), each resized to the tile size by the index's own rule (a box read, then
engine.images.resize_bilinear: engine.slides.read_box_array), so a region of an indexed slide
at the slide's mpp embeds to the very vectors the index holds for those tiles; tiles with less than MIN_TISSUE tissue are dropped, and a region left with none is
refused as blank (this is the one tissue rule for region queries: the web app and the CLI
leave it to this module)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.errors import QueryError
from engine.images import encoder_input

MPP_RATIO_MAX = 4.0  # a region more than 4x finer or coarser than the index is refused ...
# ... give or take this factor: scanners' nominal resolutions are not round (a "40x" Aperio
# scan is 0.2495 - 0.2525 um/px, and a 2x zoom of a 0.499 um/px slide 0.2495), and a region
# 4.01x finer than an index at 1 um/px is as searchable as one 4x finer
MPP_RATIO_SLACK = 1.02
MIN_TISSUE = 0.25  # a query tile needs this much tissue to be searched
MAX_QUERY_TILES = 64
# A region is resampled to the index's mpp before it is tiled, which can multiply its pixels
# by up to MPP_RATIO_MAX^2 (a 6300 x 6300 upload at 4 um/px became 25200 x 25200, 7 GB with
# its tissue mask, issue 11): the resampled size is checked against this before anything is
# allocated. 16 Mpx is a 4 x 4 mm region at 1 um/px, ~300 tiles of 224 px, far more than the
# MAX_QUERY_TILES searched; about 50 MB as RGB.
MAX_QUERY_PIXELS = 16_000_000
MAX_QUERY_ASPECT = 32  # longer side / shorter side: a thinner strip is a selection mistake
# the tissue mask of a region (~50 bytes per pixel while computed) is taken from a copy of
# it reduced to at most this many pixels
MASK_MAX_PIXELS = 2_000_000


def region_mpp(mpp: float | None, magnification: float | None, index_mpp: float) -> float | None:
    """The region's um/px: `mpp`, else 10 / `magnification`, else None (unknown: the engine
    estimates it, engine.search.scale)."""
    if mpp is None and magnification is not None:
        if not (np.isfinite(magnification) and magnification > 0):
            raise QueryError(
                f"the region's magnification must be a positive number (e.g. 20 for 20x), not {magnification!r}"
            )
        return 10.0 / magnification
    if mpp is None:
        return None
    mpp = float(mpp)
    if not (np.isfinite(mpp) and mpp > 0):
        raise QueryError(f"the region's resolution must be a positive number of um/px, not {mpp!r}")
    return mpp


def _resampled_size(src: tuple[int, int], mpp: float, index_mpp: float, tile: int) -> tuple[int, int]:
    """The region's size at the index's mpp (zoomed up to one tile when between half a tile
    and a tile), or a QueryError saying why it cannot be searched. Checked before any pixel
    is allocated."""
    scale = mpp / index_mpp
    if not 1 / (MPP_RATIO_MAX * MPP_RATIO_SLACK) <= scale <= MPP_RATIO_MAX * MPP_RATIO_SLACK:
        raise QueryError(
            f"the region is at {mpp:g} um/px, the index at {index_mpp:g} um/px: more than {MPP_RATIO_MAX:g}x apart; give the region's true mpp or magnification, or export it closer to {index_mpp:g} um/px"
        )
    src_w, src_h = src
    if max(src_w, src_h) > MAX_QUERY_ASPECT * min(src_w, src_h):
        raise QueryError(
            f"the region is {src_w} x {src_h} px, more than {MAX_QUERY_ASPECT} times longer than wide; select a part of it nearer to a square"
        )
    w, h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
    if min(w, h) < tile // 2:
        raise QueryError(
            f"at the index's {index_mpp:g} um/px the region is {w} x {h} px; at least {tile // 2} x {tile // 2} are needed (select a larger region)"
        )
    if min(w, h) < tile:
        # between half a tile and a tile: zoom it up to one tile rather than pad with glass
        grow = tile / min(w, h)
        w, h = max(tile, round(w * grow)), max(tile, round(h * grow))
    if w * h > MAX_QUERY_PIXELS:
        # the largest upload of the same shape that fits, in the upload's own pixels
        fit = (MAX_QUERY_PIXELS / (w * h)) ** 0.5
        raise QueryError(
            f"the region is too large to search: {src_w} x {src_h} px at {mpp:g} um/px covers {src_w * mpp / 1000:.1f} x {src_h * mpp / 1000:.1f} mm, "
            f"{w} x {h} px at the index's {index_mpp:g} um/px, and a search takes at most {MAX_QUERY_PIXELS / 1e6:g} Mpx there; "
            f"select a smaller area (at most {int(src_w * fit)} x {int(src_h * fit)} px at {mpp:g} um/px), or check that {mpp:g} um/px is the region's true resolution"
        )
    return w, h


def source_tile_px(size: tuple[int, int], mpp: float, index_mpp: float, tile: int) -> int:
    """The region's pixels under one index tile edge: the rule the index reads its tiles by
    (engine.slides.tile_size0), or the region's shorter side when that is less (a region
    between half a tile and a tile is zoomed up to one tile rather than padded with glass)."""
    return max(1, min(round(tile * index_mpp / mpp), min(size)))


def region_mask(image: Image.Image, mpp: float | None = None) -> np.ndarray:
    """The region's tissue mask, on a copy reduced to at most MASK_MAX_PIXELS: the mask's float
    images cost ~50 bytes per pixel, and tissue fractions per tile do not need every pixel (a
    tile stays >= ~80 px across in the reduced copy). With the region's um/px known, fat
    vacuoles count as tissue (engine.tissue.fill_fat needs the scale to tell a fat cell from
    open glass); at an unknown scale they do not."""
    from engine.tissue import tissue_mask_rgb

    f = 1
    while (image.width // f) * (image.height // f) > MASK_MAX_PIXELS:
        f += 1
    rgb = image.convert("RGB")
    return tissue_mask_rgb(np.asarray(rgb.reduce(f) if f > 1 else rgb), mpp=mpp * f if mpp else None)


def tissue_tiles(
    image: Image.Image, mpp: float, index_mpp: float, tile: int, mask: np.ndarray | None = None
) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
    """The region's query tiles for an index at `index_mpp` with `tile` px tiles: (edge of a
    tile in the region's own pixels, their top-left corners in the region, their grid cells).
    A centred grid of tiles with at least MIN_TISSUE tissue, the MAX_QUERY_TILES with most
    first. A QueryError when its size cannot be searched or no tile holds enough tissue (the
    region looks blank).

    The one tissue rule of region queries: the web app calls this before it has an engine,
    the engine again on every search. Cheap: the mask is taken on a copy of the upload
    reduced to at most MASK_MAX_PIXELS (region_mask; `mask`: made once for several mpp), and
    nothing is resampled."""
    if not (np.isfinite(mpp) and mpp > 0):
        raise QueryError(f"the region's resolution must be a positive number of um/px, not {mpp!r}")
    _resampled_size(image.size, mpp, index_mpp, tile)  # the size checks
    src = source_tile_px(image.size, mpp, index_mpp, tile)
    if mask is None:
        mask = region_mask(image, mpp)
    sx, sy = mask.shape[1] / image.width, mask.shape[0] / image.height  # mask pixels per region pixel
    nx, ny = image.width // src, image.height // src
    ox, oy = (image.width - nx * src) // 2, (image.height - ny * src) // 2
    cands = []
    for j in range(ny):
        for i in range(nx):
            x, y = ox + i * src, oy + j * src
            r0, c0 = int(y * sy), int(x * sx)
            r1, c1 = max(r0 + 1, math.ceil((y + src) * sy)), max(c0 + 1, math.ceil((x + src) * sx))
            frac = float(mask[r0:r1, c0:c1].mean())
            if frac >= MIN_TISSUE:
                cands.append((frac, x, y, i, j))
    if not cands:
        raise QueryError(
            f"the region looks blank: no {tile} px tile of it has {MIN_TISSUE:.0%} tissue; select an area with tissue"
        )
    cands = sorted(cands, key=lambda c: -c[0])[:MAX_QUERY_TILES]
    return src, [(c[1], c[2]) for c in cands], [(c[3], c[4]) for c in cands]


def cut_tiles(image: Image.Image, src: int, corners: list[tuple[int, int]], tile: int) -> list[np.ndarray]:
    """The region's squares of `src` px at `corners`, each resized to `tile` px by the index's
    one filter (engine.images.resize_bilinear), as the index's tiles are read
    (engine.slides.read_box_array: a box of the slide, resized to the tile)."""
    from engine.images import resize_bilinear

    arr = np.asarray(image.convert("RGB"))
    out = []
    for x, y in corners:
        box = np.array(arr[y : y + src, x : x + src], order="C")  # a copy: PIL's array is read-only, torch warns
        out.append(box if src == tile else resize_bilinear(box, tile))
    return out


def region_tiles(
    image: Image.Image, mpp: float, index_mpp: float, tile: int
) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """The query tiles of a region image at `mpp` um/px for an index at `index_mpp` with
    `tile` px tiles (tissue_tiles): each tile's square of the region resized to `tile` px by
    the index's own rule (cut_tiles), so the region of an indexed slide at its own mpp gives
    the very tiles the index holds. Returns (tiles as tile x tile x 3 uint8 arrays, their
    grid cells times `tile`). Every size is checked before anything is resampled: at most
    MAX_QUERY_PIXELS at the index's mpp, at most MAX_QUERY_ASPECT times longer than wide."""
    src, corners, cells = tissue_tiles(image, mpp, index_mpp, tile)
    return cut_tiles(image, src, corners, tile), [(i * tile, j * tile) for i, j in cells]


def embed(encoder, tiles: list[Image.Image | np.ndarray], tile_px: int) -> np.ndarray:
    """Unit-length features of the tiles, as the index holds them."""
    return encoder.embed_unit(torch.stack([encoder_input(t, tile_px) for t in tiles]))


def file_mosaic(
    path: Path, default_mpp: float | None, encoder, index_mpp: float, tile_px: int
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Mosaic of a slide file that is not in the archive: tissue tiles on the index's
    grid, clustered by colour (so only the mosaic tiles are read and embedded)."""
    from engine.search.mosaic import colour_histograms, select_mosaic
    from engine.slides import describe_slide, open_slide, read_box
    from engine.tiling import tile_grid
    from engine.tissue import slide_thumbnail, tissue_mask_rgb

    slide = open_slide(path)
    try:
        info = describe_slide(path, slide, default_mpp)
        thumb, ds = slide_thumbnail(slide)
        boxes = tile_grid(info, tissue_mask_rgb(thumb), ds, index_mpp, tile_px, min_tissue=0.5)
        if not boxes:
            raise QueryError(f"{path.name}: no tissue tiles found at {index_mpp:g} um/px; is it blank or very small?")
        arr = np.array([(b.x, b.y, b.size) for b in boxes], np.float64)
        pick = select_mosaic(colour_histograms(thumb, arr, ds), arr[:, :2])
        chosen = [boxes[i] for i in pick]
        xq = embed(encoder, [read_box(slide, b.x, b.y, b.size, tile_px) for b in chosen], tile_px)
    finally:
        slide.close()
    return xq, [(b.x, b.y, b.size) for b in chosen]
