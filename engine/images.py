"""Reading ordinary images (tiles, patches, uploaded regions) safely as RGB.

Whole-slide images are not read here: see the slide module. Every tile that becomes encoder
input -- a slide tile read by the indexer, an image of `engine features`, a query region,
a pretraining tile -- goes through `encoder_input` (`to_uint8_chw` is the same for PIL
images), and every resize to tile size through `resize_bilinear`, the one resampling filter
(read_box_array in the slide module uses it too), so index, features, search and benchmark
see the same pixels.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.errors import ImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
# Refuse anything larger than this many pixels before decoding it (decompression bombs).
DEFAULT_MAX_PIXELS = 100_000_000


def open_rgb(
    source: str | Path | bytes | io.BufferedIOBase, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode an image file (path, bytes or binary stream) into an RGB PIL image.

    Raises ImageError naming the file when it is not an image, is truncated, or would
    decode to more than `max_pixels` pixels (checked from the header, before decoding).
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "upload")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} pixels is more than the {max_pixels:,} allowed; crop a smaller region"
                )
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{label}: image is too large to decode safely (decompression bomb?); crop a smaller region"
        ) from None
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: not a readable image ({exc})") from None
    if img.mode != "RGB":
        if img.mode in ("I;16", "I;16B", "I", "F"):
            raise ImageError(f"{label}: {img.mode} (non-8-bit) images are not brightfield RGB")
        img = img.convert("RGB")
    return img


def resize_bilinear(hwc: np.ndarray, out_px: int) -> np.ndarray:
    """H x W x C uint8 (C = 3 or 4) -> out_px x out_px x C: the project's one resampling
    filter, PIL's antialiased bilinear as computed by torch's uint8 channels-last kernel
    (equal to PIL within 1 grey level and several times faster; docs/benchmarks.md,
    issue 14). Three bands are padded to four for the resize: the kernel is fast for four."""
    import torch.nn.functional as F

    bands = hwc.shape[2]
    if bands == 3:
        padded = np.empty((*hwc.shape[:2], 4), np.uint8)
        padded[..., :3] = hwc
        padded[..., 3] = 255
        hwc = padded
    t = torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(t, size=(out_px, out_px), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()[..., :bands]


def encoder_input(tile: Image.Image | np.ndarray, size_px: int | None = 224) -> torch.Tensor:
    """An RGB tile (PIL image, or H x W x 3 uint8 array) -> the encoder's input, a uint8
    3 x size_px x size_px tensor, resized with `resize_bilinear` when it is not already that
    size (size_px None: kept as it is). An array of the right size is not copied: the result
    is a C x H x W view of it (a batch's torch.stack makes the one copy)."""
    if isinstance(tile, Image.Image):
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        arr = np.array(tile, dtype=np.uint8)  # a writable copy: PIL's buffer is read-only
    else:
        arr = tile
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 RGB array, got {arr.dtype} {arr.shape}")
    if size_px is not None and arr.shape[:2] != (size_px, size_px):
        arr = resize_bilinear(arr, size_px)
    return torch.from_numpy(arr).permute(2, 0, 1)


def to_uint8_chw(img: Image.Image, size_px: int | None = 224) -> torch.Tensor:
    """RGB PIL image -> uint8 3 x H x W tensor, resized to size_px x size_px: `encoder_input`."""
    return encoder_input(img, size_px)


def find_images(inputs: list[str | Path]) -> list[Path]:
    """Files given directly, plus image files found recursively under given folders, in
    sorted order (so row order is reproducible)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            raise ImageError(f"{path}: no such file or folder")
    return found
