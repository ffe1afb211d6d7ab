"""Reading search requests (form fields or JSON) and uploaded regions, shared by the pages
and the JSON API, with messages a pathologist can act on.

An upload is checked in this order: size (Flask refuses bodies over MAX_CONTENT_LENGTH with
413 before reading them), type by its first bytes (not its name or claimed content type),
pixel count from the header before decoding (decompression bombs), then edge length and
tissue content.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from flask import abort
from PIL import Image

from engine.catalog.models import MAX_ROW_ID
from engine.errors import ImageError, QueryError
from engine.images import open_rgb

# Signatures of the image types a region may arrive as.
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
FILTER_FIELDS = ("site", "diagnosis", "collection", "label")
CHECK_MAX_PIXELS = 1_000_000  # pixels of the reduced copy the blank-region check looks at
MAGNIFICATIONS = (40.0, 20.0, 10.0, 5.0)


def sniff_type(head: bytes) -> str | None:
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


@dataclasses.dataclass
class SearchParams:
    top_k: int
    filters: dict[str, str]
    mpp: float | None = None
    magnification: float | None = None

    def describe(self) -> dict:
        return {"top_k": self.top_k, "filters": self.filters, "mpp": self.mpp, "magnification": self.magnification}


def _number(values, name: str, cast, low, high):
    """values[name] as a number of type `cast` within [low, high]; None when absent; a 400
    for anything else. JSON may hand over floats (1e20, 1e308) and form fields strings
    ("inf", "nan"): non-finite and (for int) fractional values are refused before they reach
    int(), which raised OverflowError (500) for infinity, or a database driver (1e20 > 2**63)."""
    raw = values.get(name)
    if raw in (None, ""):
        return None
    bad = f"{name} must be a {'whole ' if cast is int else ''}number between {low} and {high}, not {str(raw)[:40]!r}"
    if isinstance(raw, bool):  # JSON true/false are ints to Python, not numbers to a user
        abort(400, description=bad)
    try:
        number = float(raw) if isinstance(raw, (int, float)) else None
        if cast is int:
            value = int(raw) if isinstance(raw, (int, str)) or (number is not None and number.is_integer()) else None
        else:
            value = float(raw)
    except (TypeError, ValueError, OverflowError):
        value = None
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        abort(400, description=bad)
    return value


def search_params(values, config, *, region: bool) -> SearchParams:
    """top_k, filters (site, diagnosis, collection) and, for a region, its mpp or
    magnification, from a form or a JSON object. For a slide search, slide_id is checked to
    be a possible catalog id here (its absence is reported by the slide search)."""
    top_k = _number(values, "top_k", int, 1, int(config["MAX_TOP_K"])) or int(config["DEFAULT_TOP_K"])
    raw_filters = values.get("filters") if isinstance(values.get("filters"), dict) else values
    filters = {}
    for field in FILTER_FIELDS:
        value = raw_filters.get(field)
        if isinstance(value, str) and value.strip():
            filters[field] = value.strip()[:200]
    params = SearchParams(top_k=top_k, filters=filters)
    if region:
        params.mpp = _number(values, "mpp", float, 0.05, 20.0)
        params.magnification = _number(values, "magnification", float, 0.5, 100.0)
        if params.mpp is None and params.magnification is None:
            abort(400, description="say how the region was captured: its microns per pixel (mpp) or its magnification (e.g. 20 for 20x)")
    else:
        _number(values, "slide_id", int, 1, MAX_ROW_ID)
    return params


def read_region_upload(storage, config) -> Image.Image:
    """The uploaded region as an RGB image, or a 400 saying what is wrong with it."""
    if storage is None or not storage.filename:
        abort(400, description="choose an image of the region to search for (PNG, JPEG or TIFF)")
    data = storage.read()
    if not data:
        abort(400, description="the uploaded file is empty")
    kind = sniff_type(data[:16])
    if kind is None:
        abort(415, description=f"{storage.filename}: not an image (PNG, JPEG, TIFF, BMP or WebP expected, judged by its content)")
    try:
        image = open_rgb(data, max_pixels=int(config["MAX_UPLOAD_PIXELS"]), name=storage.filename)
    except ImageError as exc:
        abort(400, description=str(exc))
    check_region(image, config)
    return image


def check_region(image: Image.Image, config) -> None:
    """Refuse regions too small to embed or with (almost) no tissue in them."""
    from engine.tissue import tissue_mask_rgb

    min_px = int(config["MIN_REGION_PX"])
    if min(image.size) < min_px:
        raise QueryError(f"the region is {image.size[0]} x {image.size[1]} pixels; at least {min_px} x {min_px} are needed to compare it with the archive")
    # The blank check needs no detail: it looks at a copy of at most CHECK_MAX_PIXELS (the
    # mask costs ~50 bytes per pixel; reducing by the shorter side alone left a 1,250,000 x 32
    # strip at full size, issue 11). The factor is capped by the shorter side so it stays >= 1 px.
    factor = 1
    while (image.width // factor) * (image.height // factor) > CHECK_MAX_PIXELS and factor < min(image.size):
        factor += 1
    rgb = np.asarray(image.reduce(factor) if factor > 1 else image)
    fraction = float(tissue_mask_rgb(rgb).mean())
    if fraction < float(config["MIN_TISSUE_FRACTION"]):
        raise QueryError(f"the region looks blank (tissue covers {fraction:.0%} of it); select an area with tissue")
