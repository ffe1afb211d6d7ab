"""Running searches for the pages and the API: parse, search, audit. Both front ends call
these two functions so a region search means the same thing in either.

`encoder` (form field or JSON) chooses which of the archive's encoders searches, by its name
as the search form's selector and GET /api/v1/encoders list them; absent: the configured one
(HISTOSEEK_ENCODER), else the archive's only one; several and none configured is a 400 that
names them."""

from __future__ import annotations

from flask import abort, current_app, g
from PIL import Image

from webapp import users
from webapp.queries import read_region_upload, search_params
from webapp.state import state


def _audit(action: str, detail: dict, result: dict) -> None:
    top = [r["slide"]["id"] for r in result.get("results", [])[:10]]
    users.record(state().catalog, g.user.id if g.get("user") else None, action, {**detail, "top_slide_ids": top})


def chosen_encoder(values) -> str | None:
    """The encoder name a search asks for (None: the default), checked against the archive's."""
    raw = values.get("encoder")
    name = raw.strip()[:200] if isinstance(raw, str) else None
    if raw is not None and not isinstance(raw, str):
        abort(400, description="encoder must be the name of one of the archive's encoders (GET /api/v1/encoders)")
    if not name:
        if state().settings.encoder:
            return None
        choices = state().encoder_choices()
        if len(choices) > 1:
            names = ", ".join(c["name"] for c in choices)
            abort(400, description=f"this archive is indexed with several encoders; choose one with `encoder`: {names}")
        return None
    names = [c["name"] for c in state().encoder_choices()]
    if name not in names:
        abort(400, description=f"no encoder {name!r} in this archive; its encoders: {', '.join(names) or 'none yet'}")
    return name


def region_search(storage, values) -> tuple[dict, Image.Image]:
    """Search with an uploaded region (a werkzeug FileStorage) and form/JSON values; returns
    the result and the decoded region (for the results page's thumbnail)."""
    config = current_app.config
    params = search_params(values, config, region=True)
    encoder = chosen_encoder(values)
    image = read_region_upload(storage, config, params)
    result = (
        state()
        .search_engine(encoder)
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
        {"filename": (storage.filename or "")[:200], "size": list(image.size), "encoder": encoder, **params.describe()},
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
    encoder = chosen_encoder(values)
    result = (
        state()
        .search_engine(encoder)
        .search_slide(
            slide_id,
            top_k=params.top_k,
            filters=params.filters or None,
            exclude_self=exclude_self,
        )
        .to_json()
    )
    _audit(
        "search_slide",
        {"slide_id": slide_id, "exclude_self": exclude_self, "encoder": encoder, **params.describe()},
        result,
    )
    return result
