"""Reading ordinary images (tiles, patches, uploaded regions) safely as RGB.

Whole-slide images are not read here: see the slide module. Everything that turns a picture
into encoder input goes through `to_uint8_chw`, so features, search and benchmark agree.
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


def open_rgb(source: str | Path | bytes | io.BufferedIOBase, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
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
                raise ImageError(f"{label}: {width}x{height} pixels is more than the {max_pixels:,} allowed; crop a smaller region")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{label}: image is too large to decode safely (decompression bomb?); crop a smaller region") from None
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: not a readable image ({exc})") from None
    if img.mode != "RGB":
        if img.mode in ("I;16", "I;16B", "I", "F"):
            raise ImageError(f"{label}: {img.mode} (non-8-bit) images are not brightfield RGB")
        img = img.convert("RGB")
    return img


def to_uint8_chw(img: Image.Image, size_px: int | None = 224) -> torch.Tensor:
    """RGB PIL image -> uint8 3 x H x W tensor, resized to size_px x size_px (bilinear,
    antialiased by PIL) when it is not already that size."""
    if size_px is not None and img.size != (size_px, size_px):
        img = img.resize((size_px, size_px), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


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
