"""Whole-slide images through OpenSlide: opening with clear errors, content fingerprints,
microns per pixel, and reading a level-0 box at a target resolution.

Coordinates are always level-0 pixels; sizes in names carry their unit (`size0` = level-0
pixels, `out_px` = output pixels).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from engine.errors import SlideError
from engine.images import resize_bilinear

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
    found = (
        f"the slide's metadata says {implausible:g} um/px, which no slide scanner produces"
        if implausible is not None
        else "the slide has no resolution in its metadata (no microns per pixel, no objective power)"
    )
    raise SlideError(f"{found}; give a default resolution (um per level-0 pixel) to index it")


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


def _read_rgba(slide: openslide.OpenSlide, x: int, y: int, level: int, size: int) -> np.ndarray:
    """OpenSlide's read_region straight into a writable size x size x 4 uint8 RGBA array.

    openslide-python's read_region fills a ctypes buffer, converts it to RGBA in place and
    wraps it in a PIL image; getting a numpy array out of that image costs a full copy through
    Pillow's raw encoder (a large share of the read; docs/benchmarks.md, issue 14). The same two library
    calls into numpy's own memory avoid it. Other slide objects (openslide.ImageSlide, or an
    openslide-python without these internals) take the public path."""
    osr = getattr(slide, "_osr", None)
    read = getattr(openslide.lowlevel, "_read_region", None)
    convert = getattr(getattr(openslide.lowlevel, "_convert", None), "argb2rgba", None)
    if osr is None or read is None or convert is None:
        return np.asarray(slide.read_region((x, y), level, (size, size))).copy()
    words = np.empty((size, size), dtype=np.uint32)
    buf = (ctypes.c_uint32 * words.size).from_buffer(words)
    read(osr, buf, x, y, level, size, size)  # raises OpenSlideError like read_region
    convert(buf)  # premultiplied ARGB -> RGBA, in place, as openslide-python does
    return words.view(np.uint8).reshape(size, size, 4)


def _flatten_array(rgba: np.ndarray) -> None:
    """In place: RGBA (H x W x 4 uint8, not premultiplied, as OpenSlide returns it) on white
    glass, rgb * a + 255 * (1 - a) rounded (PIL's paste with the alpha mask within 1 level),
    alpha set to opaque. Four bands stay: torch's fast uint8 resize kernel wants them."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)
    rgba[..., :3] = (rgb + 127) // 255
    rgba[..., 3] = 255


def read_box_array(slide: openslide.OpenSlide, x: int, y: int, size0: int, out_px: int) -> np.ndarray:
    """The level-0 square (x, y, size0) as an out_px x out_px x 3 uint8 RGB array (possibly a
    strided view), read from the coarsest pyramid level that still has at least out_px pixels
    across, then resized (engine.images.resize_bilinear, the one filter). Transparent (outside-scan) pixels become
    white, as background glass; flattening runs only where the region is not opaque, at the
    read resolution, before resizing."""
    # OpenSlide's level choice, exactly as before. Taking a level within 0.5 % of the factor
    # (an SVS "4x" level at 4.0002x) was measured to move dense tissue by up to 6 grey levels
    # (the scanner's downsampling is not our bilinear filter), beyond the 2 that index and
    # query tiles may differ by (tests/test_decode.py, docs/benchmarks.md).
    level = slide.get_best_level_for_downsample(max(size0 / out_px, 1.0))
    read_px = max(1, int(round(size0 / slide.level_downsamples[level])))
    try:
        rgba = _read_rgba(slide, int(x), int(y), level, read_px)
    except openslide.OpenSlideError as exc:
        raise SlideError(f"cannot read region ({x}, {y}, {size0}) of the slide: {exc}") from None
    # As uint32 little-endian words a pixel is opaque iff its word is >= 0xFF000000: one
    # cheap vector pass; most tiles lie wholly inside the scan and skip the flattening.
    if not (rgba.view("<u4") >= 0xFF000000).all():
        _flatten_array(rgba)
    # RGBA through the resize (torch's uint8 kernel is fast for 4 bands, ~7x slower for 3);
    # the alpha band is dropped as a view
    if rgba.shape[0] != out_px or rgba.shape[1] != out_px:
        rgba = resize_bilinear(rgba, out_px)
    return rgba[..., :3]


def read_box(slide: openslide.OpenSlide, x: int, y: int, size0: int, out_px: int) -> Image.Image:
    """read_box_array as an RGB PIL image (search queries, localisation, pretraining)."""
    return Image.fromarray(np.ascontiguousarray(read_box_array(slide, x, y, size0, out_px)), "RGB")


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
