"""Deep-zoom tiles of slides for OpenSeadragon, from `openslide.deepzoom`.

URLs follow the DZI convention (`<id>.dzi` and `<id>_files/<level>/<col>_<row>.jpeg`), so
OpenSeadragon needs no custom tile source. Only integers and a fixed set of formats come
from the URL; the slide's file path comes from the catalog.
"""

from __future__ import annotations

from flask import Blueprint, Response, abort

from webapp.state import state

bp = Blueprint("tiles", __name__, url_prefix="/tiles")

FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png")}


@bp.get("/<int:slide_id>.dzi")
def dzi(slide_id: int):
    xml = state().slides.dzi(slide_id)
    response = Response(xml, mimetype="application/xml")
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@bp.get("/<int:slide_id>_files/<int:level>/<int:col>_<int:row>.<fmt>")
def tile(slide_id: int, level: int, col: int, row: int, fmt: str):
    if fmt not in FORMATS:
        abort(404, description=f"tile format must be one of {', '.join(FORMATS)}")
    pil_format, mimetype = FORMATS[fmt]
    response = Response(state().slides.encoded_tile(slide_id, level, col, row, pil_format), mimetype=mimetype)
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response
