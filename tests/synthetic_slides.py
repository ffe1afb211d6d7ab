"""Synthetic pyramidal TIFF slides that OpenSlide reads as "generic-tiff", made from any RGB
array: tiled, deflate-compressed, with 2x sub-resolution levels as further pages and
resolution tags from which OpenSlide takes the microns per pixel.

Deflate rather than JPEG because tifffile writes it without the optional imagecodecs package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def _halve(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb).resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BOX)
    return np.asarray(img)


def write_pyramidal_tiff(path: str | Path, rgb: np.ndarray, mpp: float | None, tile: int = 256, min_level_px: int = 512) -> Path:
    """Write `rgb` (H x W x 3 uint8) as a tiled pyramidal TIFF at `path`.

    mpp:          microns per level-0 pixel written into the resolution tags (None: no tags,
                  so OpenSlide reports no mpp, like a slide without metadata)
    tile:         tile edge in pixels (multiple of 16, as TIFF requires)
    min_level_px: levels are halved until the longer side is below this
    """
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"need an H x W x 3 uint8 array, got {rgb.shape} {rgb.dtype}")
    if tile % 16:
        raise ValueError("tile must be a multiple of 16")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = [rgb]
    while max(levels[-1].shape[:2]) >= 2 * min_level_px:
        levels.append(_halve(levels[-1]))
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31) as tif:
        for i, level in enumerate(levels):
            kwargs = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**i)
                kwargs = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                level,
                photometric="rgb",
                tile=(tile, tile),
                compression="zlib",
                subfiletype=1 if i else 0,
                metadata=None,
                **kwargs,
            )
    return path


def tissue_blobs(height: int, width: int, seed: int = 0, n_blobs: int = 3, radius: tuple[float, float] = (0.12, 0.25)) -> np.ndarray:
    """An H x W x 3 uint8 'slide': white glass with a few pink-purple elliptical tissue blobs
    carrying texture, so tissue masks and encoders see something slide-like. Blob radii are
    drawn from `radius` (fractions of the slide's height and width)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), 240, np.uint8)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(*radius) * height, rng.uniform(*radius) * width
        y0, y1 = max(0, int(cy - ry)), min(height, int(cy + ry) + 1)
        x0, x1 = max(0, int(cx - rx)), min(width, int(cx + rx) + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        base = np.array([200, 110, 170], np.int16) + rng.integers(-30, 30, 3).astype(np.int16)
        noise = rng.integers(-40, 40, (int(inside.sum()), 3), dtype=np.int16)
        region = rgb[y0:y1, x0:x1]
        region[inside] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return rgb
