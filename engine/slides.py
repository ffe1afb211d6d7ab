"""Whole-slide images through OpenSlide: opening with clear errors, content fingerprints,
microns per pixel, and reading a level-0 box at a target resolution.

Coordinates are always level-0 pixels; sizes in names carry their unit (`size0` = level-0
pixels, `out_px` = output pixels).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from engine.errors import SlideError

# How much of a file the fingerprint reads: size + head + tail + evenly spaced samples.
# Reading whole multi-GB slides would make re-scanning a 34,000-slide archive take hours;
# any change of content that keeps the size and all sampled blocks is vanishingly unlikely
# for compressed image data.
_FP_BLOCK = 1 << 20
_FP_SAMPLES = 16


@dataclasses.dataclass(frozen=True)
class SlideInfo:
    path: Path
    vendor: str | None
    width: int
    height: int
    mpp: float
    mpp_source: str  # "metadata", "objective-power" or "default"
    level_downsamples: tuple[float, ...]


def fingerprint(path: str | Path) -> str:
    """Content identity of a slide file (sha256 over size, head, tail and sampled blocks),
    so a moved or renamed file is recognised and a changed one is not."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= (_FP_SAMPLES + 2) * _FP_BLOCK:
            for chunk in iter(lambda: fh.read(_FP_BLOCK), b""):
                digest.update(chunk)
        else:
            offsets = [0, size - _FP_BLOCK] + [int(size * (i + 1) / (_FP_SAMPLES + 1)) for i in range(_FP_SAMPLES)]
            for offset in offsets:
                fh.seek(offset)
                digest.update(fh.read(_FP_BLOCK))
    return digest.hexdigest()


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open any format OpenSlide reads; a clear SlideError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{path.name}: not a whole-slide format OpenSlide can read") from None
    except openslide.OpenSlideError as exc:
        raise SlideError(f"{path.name}: OpenSlide cannot open it ({exc})") from None
    except OSError as exc:
        raise SlideError(f"{path.name}: cannot be read ({exc})") from None


def slide_mpp(slide: openslide.OpenSlide, default_mpp: float | None = None) -> tuple[float, str]:
    """Microns per level-0 pixel: from the slide's metadata, else from its objective power
    (10 / power, i.e. 20x -> 0.5), else `default_mpp`; otherwise a SlideError saying so."""
    props = slide.properties
    implausible = None
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            value = float(props.get(key, "nan"))
        except ValueError:
            continue
        if np.isfinite(value) and 0.01 < value < 100:
            return value, "metadata"
        if np.isfinite(value):
            implausible = value
    try:
        power = float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER, "nan"))
    except ValueError:
        power = float("nan")
    if np.isfinite(power) and power > 0:
        return 10.0 / power, "objective-power"
    if default_mpp is not None:
        return float(default_mpp), "default"
    found = f"its metadata says {implausible:g} um/px, which no slide scanner produces" if implausible is not None else "slide has no microns-per-pixel or objective-power metadata"
    raise SlideError(f"{found}; pass --default-mpp X (microns per level-0 pixel) to index it")


def describe_slide(path: str | Path, slide: openslide.OpenSlide, default_mpp: float | None = None) -> SlideInfo:
    mpp, source = slide_mpp(slide, default_mpp)
    width, height = slide.dimensions
    return SlideInfo(
        path=Path(path),
        vendor=slide.properties.get(openslide.PROPERTY_NAME_VENDOR),
        width=width,
        height=height,
        mpp=mpp,
        mpp_source=source,
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
    )


def flatten_rgba(img: Image.Image) -> Image.Image:
    """OpenSlide's RGBA as RGB: transparent (outside-scan) pixels become white, as
    background glass."""
    rgb = Image.new("RGB", img.size, (255, 255, 255))
    rgb.paste(img, mask=img.getchannel("A"))
    return rgb


def read_box(slide: openslide.OpenSlide, x: int, y: int, size0: int, out_px: int) -> Image.Image:
    """The level-0 square (x, y, size0) as an RGB image of out_px x out_px, read from the
    coarsest pyramid level that still has at least out_px pixels across, then resized.
    Transparent (outside-scan) pixels become white, as background glass."""
    downsample = size0 / out_px
    level = slide.get_best_level_for_downsample(max(downsample, 1.0))
    level_ds = slide.level_downsamples[level]
    size_level = max(1, int(round(size0 / level_ds)))
    try:
        region = slide.read_region((int(x), int(y)), level, (size_level, size_level))
    except openslide.OpenSlideError as exc:
        raise SlideError(f"cannot read region ({x}, {y}, {size0}) of the slide: {exc}") from None
    rgb = flatten_rgba(region)
    if rgb.size != (out_px, out_px):
        rgb = rgb.resize((out_px, out_px), Image.Resampling.BILINEAR)
    return rgb


def read_tile(path: str | Path, x: int, y: int, size0: int, out_px: int) -> Image.Image:
    """One-off read of a tile from a slide file (opens and closes the slide)."""
    slide = open_slide(path)
    try:
        return read_box(slide, x, y, size0, out_px)
    finally:
        slide.close()


def tile_size0(info: SlideInfo, target_mpp: float, tile_px: int) -> int:
    """Level-0 pixels covered by one tile edge of tile_px pixels at target_mpp."""
    return max(1, int(round(tile_px * target_mpp / info.mpp)))

