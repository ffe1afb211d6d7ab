"""Reading search requests (form fields or JSON) and uploaded regions, shared by the pages
and the JSON API, with messages a pathologist can act on.

An upload is checked in this order: size (Flask refuses bodies over MAX_CONTENT_LENGTH with
413 before reading them), type by its first bytes (not its name or claimed content type),
pixel count from the header before decoding (decompression bombs), then edge length and
tissue content.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flask import abort
from PIL import Image

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
    raw = values.get(name)
    if raw in (None, ""):
        return None
    try:
        value = cast(raw)
    except (TypeError, ValueError):
        abort(400, description=f"{name} must be a number, not {str(raw)[:40]!r}")
    if not low <= value <= high:
        abort(400, description=f"{name} must be between {low} and {high}")
    return value


def search_params(values, config, *, region: bool) -> SearchParams:
    """top_k, filters (site, diagnosis, collection) and, for a region, its mpp or
    magnification, from a form or a JSON object."""
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
    rgb = np.asarray(image.copy().reduce(max(1, min(image.size) // 256)) if min(image.size) > 512 else image)
    fraction = float(tissue_mask_rgb(rgb).mean())
    if fraction < float(config["MIN_TISSUE_FRACTION"]):
        raise QueryError(f"the region looks blank (tissue covers {fraction:.0%} of it); select an area with tissue")
