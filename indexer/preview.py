"""`indexer preview`: a picture of what `build` would embed of one slide (its thumbnail, the
tissue mask tinted, and the kept tiles outlined), to choose --min-tissue before a long run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import openslide
from PIL import Image, ImageDraw

from engine.errors import SlideError
from engine.slides import describe_slide, open_slide
from engine.tiling import TileBox, tile_grid
from engine.tissue import slide_thumbnail, tissue_mask_rgb

MASK_TINT = np.array([0, 160, 255], np.float32)  # blue-ish: no H&E colour, easy to tell apart
TILE_COLOUR = (0, 200, 0)


@dataclasses.dataclass
class Preview:
    image: Image.Image
    tiles: list[TileBox]
    tissue_fraction: float
    mpp: float
    mpp_source: str


def preview_slide(
    path: str | Path,
    *,
    target_mpp: float,
    tile_px: int,
    min_tissue: float,
    default_mpp: float | None = None,
    max_px: int = 1600,
) -> Preview:
    """The thumbnail (longest side max_px) with the tissue mask tinted and the tiles that
    `indexer build` would embed outlined. Mask and tiles are computed exactly as the build
    does (same thumbnail size), then drawn at max_px."""
    slide = open_slide(path)
    try:
        info = describe_slide(path, slide, default_mpp)
        try:
            rgb, downsample = slide_thumbnail(slide)
        except openslide.OpenSlideError as exc:
            raise SlideError(f"cannot read the slide's pixels: {exc}") from None
    finally:
        slide.close()
    mask = tissue_mask_rgb(rgb)
    tiles = tile_grid(info, mask, downsample, target_mpp, tile_px, min_tissue)
    shown = rgb.astype(np.float32)
    shown[mask] = 0.6 * shown[mask] + 0.4 * MASK_TINT
    image = Image.fromarray(shown.astype(np.uint8))
    scale = min(1.0, max_px / max(image.size))
    if scale < 1.0:
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR
        )
    draw = ImageDraw.Draw(image)
    px = scale / downsample  # picture pixels per level-0 pixel
    for t in tiles:
        draw.rectangle(
            [t.x * px, t.y * px, (t.x + t.size) * px - 1, (t.y + t.size) * px - 1],
            outline=TILE_COLOUR,
            width=max(1, round(max(image.size) / 800)),
        )
    return Preview(image, tiles, float(mask.mean()), info.mpp, info.mpp_source)
