"""The tile grid of a slide: square tiles at a target resolution, as level-0 boxes, kept
where the tissue mask covers enough of them.

The grid starts at the slide's origin with a stride of one tile (no overlap), and only
whole tiles are kept (a partial tile at the right/bottom edge would be padded glass). Its
order (row by row, top to bottom) is the order of tile ids, so a rerun gives the same ids.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.slides import SlideInfo, tile_size0


@dataclasses.dataclass(frozen=True)
class TileBox:
    """A square tile in level-0 pixels: top-left (x, y), edge `size`, and the fraction of
    it that the tissue mask covers."""

    x: int
    y: int
    size: int
    tissue_fraction: float


def tissue_fractions(mask: np.ndarray, mask_downsample: float, boxes0: np.ndarray) -> np.ndarray:
    """Fraction of tissue under each level-0 box (rows of x, y, size) of a mask whose
    pixels each cover mask_downsample level-0 pixels, from the mask's summed-area table.
    A box smaller than a mask pixel takes the pixel it falls in."""
    if mask_downsample <= 0:
        raise ValueError("mask_downsample must be > 0")
    mh, mw = mask.shape
    integral = np.zeros((mh + 1, mw + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    boxes0 = np.asarray(boxes0, np.float64).reshape(-1, 3)
    x, y, size = boxes0[:, 0], boxes0[:, 1], boxes0[:, 2]
    x0 = np.minimum(mw - 1, np.floor(x / mask_downsample)).astype(np.int64)
    y0 = np.minimum(mh - 1, np.floor(y / mask_downsample)).astype(np.int64)
    x1 = np.minimum(mw, np.maximum(x0 + 1, np.ceil((x + size) / mask_downsample))).astype(np.int64)
    y1 = np.minimum(mh, np.maximum(y0 + 1, np.ceil((y + size) / mask_downsample))).astype(np.int64)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / ((y1 - y0) * (x1 - x0))


def tile_grid(
    info: SlideInfo,
    mask: np.ndarray,
    mask_downsample: float,
    target_mpp: float,
    tile_px: int,
    min_tissue: float,
) -> list[TileBox]:
    """Tiles of `tile_px` pixels at `target_mpp` (level-0 boxes) whose tissue fraction is at
    least `min_tissue` (0..1), row by row."""
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be within 0..1, got {min_tissue}")
    size0 = tile_size0(info, target_mpp, tile_px)
    xs = np.arange(0, info.width - size0 + 1, size0)
    ys = np.arange(0, info.height - size0 + 1, size0)
    if not len(xs) or not len(ys):
        return []
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    boxes0 = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, size0)], axis=1)
    fractions = tissue_fractions(mask, mask_downsample, boxes0)
    return [
        TileBox(int(x), int(y), int(size), round(float(f), 4))
        for (x, y, size), f in zip(boxes0, fractions)
        if f >= min_tissue and f > 0
    ]
