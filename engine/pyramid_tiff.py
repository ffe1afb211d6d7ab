"""Writing an RGB array as a pyramidal TIFF that OpenSlide reads as "generic-tiff": tiled,
deflate-compressed, with 2x sub-resolution levels as further pages and resolution tags from
which OpenSlide takes the microns per pixel. Used for the demo archive, benchmark slides and
test fixtures.

Deflate rather than JPEG because tifffile writes it without the optional imagecodecs package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from engine.files import atomic_output


def halve(rgb: np.ndarray) -> np.ndarray:
    """Half the width and height (box filter): the next pyramid level."""
    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb).resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BOX)
    return np.asarray(img)


def write_pyramidal_tiff(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float | None,
    tile: int = 256,
    min_level_px: int = 512,
    level_factor: int = 2,
) -> Path:
    """Write `rgb` (H x W x 3 uint8) as a tiled pyramidal TIFF at `path`.

    mpp:          microns per level-0 pixel written into the resolution tags (None: no tags,
                  so OpenSlide reports no mpp, like a slide without metadata)
    tile:         tile edge in pixels (multiple of 16, as TIFF requires)
    min_level_px: levels are reduced until the longer side is below this
    level_factor: downsample between levels, 2 or 4 (4: levels at 1x, 4x, 16x, as a 20x SVS)
    """
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"need an H x W x 3 uint8 array, got {rgb.shape} {rgb.dtype}")
    if tile % 16:
        raise ValueError("tile must be a multiple of 16")
    path = Path(path)
    if level_factor not in (2, 4):
        raise ValueError("level_factor must be 2 or 4")
    levels = [rgb]
    while max(levels[-1].shape[:2]) >= level_factor * min_level_px:
        nxt = levels[-1]
        for _ in range(level_factor // 2):
            nxt = halve(nxt)
        levels.append(nxt)
    # temp + rename: a reader (or an interrupted run) never sees half a slide
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tif:
        for i, level in enumerate(levels):
            kwargs = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * level_factor**i)
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
