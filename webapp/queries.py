"""Reading search requests (form fields or JSON) and uploaded regions, shared by the pages
and the JSON API, with messages a pathologist can act on.

An upload is checked in this order: size (Flask refuses bodies over MAX_CONTENT_LENGTH with
413 before reading them), type by its first bytes (not its name or claimed content type),
pixel count from the header before decoding (decompression bombs), then edge length. Its
tissue content is judged by the search engine alone (engine.search.query: a region none of
whose tiles holds enough tissue is refused as blank, a QueryError the app answers with 422),
so the web app and the CLI refuse the same regions.
"""

from __future__ import annotations

import dataclasses
import math

from flask import abort, current_app
from PIL import Image

from engine.catalog.models import MAX_ROW_ID
from engine.errors import ImageError, QueryError
from engine.images import open_rgb
from engine.search.filters import FILTER_FIELDS

# Signatures of the image types a region may arrive as.
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
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
    """top_k, filters (engine.search.filters.FILTER_FIELDS) and, for a region, its mpp or
    magnification (both optional: unknown is estimated), from a form or a JSON object. For a slide search, slide_id is checked to
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
        # neither: the resolution is unknown, and the engine estimates it (engine.search.scale)
    else:
        _number(values, "slide_id", int, 1, MAX_ROW_ID)
    return params


def read_region_upload(storage, config, params: SearchParams) -> Image.Image:
    """The uploaded region (at the resolution `params` say) as an RGB image, or a 4xx saying
    what is wrong with it."""
    if storage is None or not storage.filename:
        abort(400, description="choose an image of the region to search for (PNG, JPEG or TIFF)")
    data = storage.read()
    if not data:
        abort(400, description="the uploaded file is empty")
    kind = sniff_type(data[:16])
    if kind is None:
        abort(
            415,
            description=f"{storage.filename}: not an image (PNG, JPEG, TIFF, BMP or WebP expected, judged by its content)",
        )
    try:
        image = open_rgb(data, max_pixels=int(config["MAX_UPLOAD_PIXELS"]), name=storage.filename)
    except ImageError as exc:
        abort(400, description=str(exc))
    check_region(image, config, params)
    return image


def check_region(image: Image.Image, config, params: SearchParams) -> None:
    """Refuse regions too small to compare with the archive, and those the search engine
    would refuse, by its own rule (engine.search.query.tissue_tiles: size at the index's
    resolution, tissue per tile), before the engine is loaded: a blank upload gets its 422
    even while the archive has no index. Once this worker's engine is loaded it checks every
    region itself, so only the size is checked here then."""
    from engine.search.query import region_mpp, tissue_tiles

    min_px = int(config["MIN_REGION_PX"])
    if min(image.size) < min_px:
        raise QueryError(
            f"the region is {image.size[0]} x {image.size[1]} pixels; at least {min_px} x {min_px} are needed to compare it with the archive"
        )
    state = current_app.extensions["histoseek"]
    if state.engine_loaded:
        return  # the engine applies the same rule on search: no second tissue mask per query
    index_mpp, tile_px = state.settings.grid_for(None)  # the index's unless built with a card
    mpp = region_mpp(params.mpp, params.magnification, index_mpp)
    if mpp is None:  # unknown: searchable at some scale of the ladder (engine.search.scale)
        from engine.search.scale import candidate_grids

        candidate_grids(image, index_mpp, tile_px)
    else:
        tissue_tiles(image, mpp, index_mpp, tile_px)
