"""Running searches for the pages and the API: parse, search, audit. Both front ends call
these two functions so a region search means the same thing in either."""

from __future__ import annotations

from flask import abort, current_app, g
from PIL import Image

from webapp import users
from webapp.queries import read_region_upload, search_params
from webapp.state import state


def _audit(action: str, detail: dict, result: dict) -> None:
    top = [r["slide"]["id"] for r in result.get("results", [])[:10]]
    users.record(state().catalog, g.user.id if g.get("user") else None, action, {**detail, "top_slide_ids": top})


def region_search(storage, values) -> tuple[dict, Image.Image]:
    """Search with an uploaded region (a werkzeug FileStorage) and form/JSON values; returns
    the result and the decoded region (for the results page's thumbnail)."""
    config = current_app.config
    params = search_params(values, config, region=True)
    image = read_region_upload(storage, config, params)
    result = (
        state()
        .search_engine()
        .search_region(
            image,
            mpp=params.mpp,
            magnification=params.magnification,
            top_k=params.top_k,
            filters=params.filters or None,
        )
        .to_json()
    )
    _audit(
        "search_region",
        {"filename": (storage.filename or "")[:200], "size": list(image.size), **params.describe()},
        result,
    )
    return result, image


def slide_search(values) -> dict:
    """Search with a whole indexed slide, named by its catalog id."""
    params = search_params(values, current_app.config, region=False)
    raw = values.get("slide_id")
    try:
        slide_id = int(raw)
    except (TypeError, ValueError):
        abort(400, description="choose a slide: slide_id must be the id of an indexed slide")
    exclude_self = str(values.get("exclude_self", "true")).lower() not in ("0", "false", "no", "off")
    result = (
        state()
        .search_engine()
        .search_slide(
            slide_id,
            top_k=params.top_k,
            filters=params.filters or None,
            exclude_self=exclude_self,
        )
        .to_json()
    )
    _audit("search_slide", {"slide_id": slide_id, "exclude_self": exclude_self, **params.describe()}, result)
    return result
