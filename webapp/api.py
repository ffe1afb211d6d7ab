"""The JSON API (/api/v1): searches, slides, benchmark runs and the OpenAPI document.
Errors are `{"error", "message"}` with a proper status code (see webapp.errors)."""

from __future__ import annotations

import io
import json
import math
import re

from flask import Blueprint, abort, current_app, g, jsonify, request, send_file, url_for
from flask.json.provider import DefaultJSONProvider

from webapp import archive, mil
from webapp.openapi import openapi_document
from webapp.searching import region_search, slide_search
from webapp.state import state

bp = Blueprint("api", __name__, url_prefix="/api/v1")

# A JSON string (with escapes) or a bracket; strings are skipped so brackets inside them do
# not count. Written without nested alternation so long strings cannot make it backtrack.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_depth(text: str) -> int:
    """How deeply the arrays/objects of a JSON text nest (a linear scan, no recursion)."""
    depth = deepest = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ValueError(f"{text[:40]} is too large a number")
    return value


class BoundedJSONProvider(DefaultJSONProvider):
    """The app's JSON parser for request bodies: refuses nesting deeper than MAX_JSON_DEPTH
    before parsing (Python's parser recurses once per level; 5,000 levels raised
    RecursionError, a 500) and NaN, Infinity and numbers that overflow to infinity, which
    are not JSON (RFC 8259) and broke every range check downstream."""

    def loads(self, s, **kwargs):
        if isinstance(s, (bytes, bytearray)):
            s = s.decode("utf-8")
        limit = int(self._app.config.get("MAX_JSON_DEPTH", 32))
        if json_depth(s) > limit:
            raise ValueError(f"JSON nested deeper than {limit} levels")
        kwargs.setdefault("parse_constant", _refuse_constant)
        kwargs.setdefault("parse_float", _finite_float)
        return json.loads(s, **kwargs)


def json_object() -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        values = current_app.json.loads(request.get_data(cache=True))
    except ValueError as exc:  # also UnicodeDecodeError and JSONDecodeError
        abort(400, description=f"the request body is not valid JSON: {exc}")
    if not isinstance(values, dict):
        abort(400, description='send a JSON object such as {"slide_id": 3, "top_k": 10}')
    return values


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        abort(400, description=f"{name} must be a whole number")
    if not low <= value <= high:
        abort(400, description=f"{name} must be between {low} and {high}")
    return value


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_document())


@bp.get("/me")
def me():
    return jsonify({"id": g.user.id, "username": g.user.username, "is_admin": g.user.is_admin, "auth": g.auth_method})


@bp.post("/search/region")
def search_region():
    result, _ = region_search(request.files.get("image"), request.form)
    return jsonify(result)


@bp.post("/search/slide")
def search_slide():
    if not request.is_json:
        return jsonify(slide_search(request.form))
    return jsonify(slide_search(json_object()))


@bp.get("/encoders")
def encoders():
    """The encoders a search may name (`encoder`), and the default one (None: none configured)."""
    choices = state().encoder_choices()
    default = state().default_encoder(choices)
    return jsonify({"encoders": [{k: c[k] for k in c if k != "id"} for c in choices], "default": default})


@bp.get("/slides")
def slides():
    per_page = _int_arg("per_page", int(current_app.config["SLIDES_PER_PAGE"]), 1, 500)
    page_no = _int_arg("page", 1, 1, 10**6)
    try:
        page = archive.list_slides(
            state().catalog,
            status=request.args.get("status") or None,
            q=request.args.get("q") or None,
            site=request.args.get("site") or None,
            diagnosis=request.args.get("diagnosis") or None,
            collection=request.args.get("collection") or None,
            page=page_no,
            per_page=per_page,
        )
    except ValueError as exc:
        abort(400, description=str(exc))
    return jsonify(
        {
            "slides": [archive.slide_json(r) for r in page.items],
            "total": page.total,
            "page": page.page,
            "per_page": page.per_page,
            "pages": page.pages,
        }
    )


@bp.get("/slides/<int:slide_id>")
def slide(slide_id: int):
    row = archive.get_slide(state().catalog, slide_id)
    body = archive.slide_json(row)
    body["dzi"] = url_for("tiles.dzi", slide_id=slide_id)
    return jsonify(body)


@bp.get("/slides/<int:slide_id>/region.jpg")
def slide_region(slide_id: int):
    """A level-0 box of a slide as a JPEG (thumbnails of matched regions)."""
    x = _int_arg("x", 0, 0, 10**7)
    y = _int_arg("y", 0, 0, 10**7)
    w = _int_arg("w", 224, 1, 10**6)
    h = _int_arg("h", 224, 1, 10**6)
    px = _int_arg("px", 192, 16, 1024)
    return _jpeg(state().slides.region(slide_id, x, y, w, h, px))


@bp.get("/slides/<int:slide_id>/thumbnail.jpg")
def slide_thumbnail(slide_id: int):
    return _jpeg(state().slides.thumbnail(slide_id, _int_arg("px", 256, 16, 1024)))


@bp.get("/benchmarks")
def benchmarks():
    return jsonify({"runs": [archive.benchmark_json(r) for r in archive.list_benchmarks(state().catalog)]})


@bp.get("/benchmarks/<int:run_id>")
def benchmark(run_id: int):
    return jsonify(archive.benchmark_json(archive.get_benchmark(state().catalog, run_id)))


@bp.get("/mil/<int:run_id>/slides/<int:slide_id>/attention")
def mil_attention(run_id: int, slide_id: int):
    """Class probabilities and per-tile attention of a slide under a MIL run (heat map)."""
    from engine.errors import EncoderError

    try:
        return jsonify(mil.attention(state().catalog, state().settings.index_dir, run_id, slide_id))
    except EncoderError as exc:  # the slide's features are of another encoder than the run's
        abort(409, description=str(exc))


def _jpeg(image):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    buf.seek(0)
    response = send_file(buf, mimetype="image/jpeg")
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response
