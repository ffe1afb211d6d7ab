"""The OpenAPI 3.1 description of the JSON API, served at /api/v1/openapi.json.

Kept beside the routes it describes; tests check that every API route appears here.
"""

from __future__ import annotations

from engine import __version__
from engine.search.filters import FILTER_FIELDS

ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*codes: int) -> dict:
    text = {
        400: "bad request or bad image",
        401: "not logged in / bad token",
        404: "not found",
        409: "the slide's features are of another encoder than the run's",
        413: "upload too large",
        415: "not an image",
        422: "query cannot be answered (blank or tiny region, unreadable slide)",
        503: "index, encoder or catalog not available",
    }
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}


def _image(description: str) -> dict:
    return {"200": {"description": description, "content": {"image/jpeg": {}}}}


def _int_param(name: str, where: str = "query", required: bool = False, description: str = "") -> dict:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": {"type": "integer"},
        "description": description,
    }


def _str_param(name: str, description: str = "") -> dict:
    return {"name": name, "in": "query", "required": False, "schema": {"type": "string"}, "description": description}


# which of the archive's encoders searches; what GET /api/v1/encoders lists
ENCODER = {"type": "string", "description": "an encoder's name; default: the configured one, else the only one"}
FILTERS = {field: {"type": "string"} for field in FILTER_FIELDS}


def openapi_document() -> dict:
    slide_id = _int_param("slide_id", "path", description="catalog id of the slide")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "histoseek API",
            "version": __version__,
            "description": "Content-based search of a whole-slide image archive (RetCCL features). Authenticate with `Authorization: Bearer <token>` (`histoseek-web users token NAME`) or a logged-in session plus the X-CSRF-Token header for POSTs.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": {
            "/api/v1/search/region": {
                "post": {
                    "summary": "Find archived slides similar to an uploaded region",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image"],
                                    "properties": {
                                        "image": {
                                            "type": "string",
                                            "format": "binary",
                                            "description": "PNG, JPEG, TIFF, BMP or WebP, checked by content",
                                        },
                                        "mpp": {
                                            "type": "number",
                                            "description": "microns per pixel of the image; optional: without it and magnification the resolution is estimated (query.scale in the result)",
                                        },
                                        "magnification": {
                                            "type": "number",
                                            "description": "objective magnification (20 = 20x); used when mpp is not given; optional",
                                        },
                                        "top_k": {"type": "integer", "default": 10},
                                        "encoder": ENCODER,
                                        **FILTERS,
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        **_json({"$ref": "#/components/schemas/SearchResult"}),
                        **_errors(400, 401, 413, 415, 422, 503),
                    },
                }
            },
            "/api/v1/search/slide": {
                "post": {
                    "summary": "Find archived slides similar to an indexed slide",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["slide_id"],
                                    "properties": {
                                        "slide_id": {"type": "integer"},
                                        "top_k": {"type": "integer", "default": 10},
                                        "exclude_self": {"type": "boolean", "default": True},
                                        "encoder": ENCODER,
                                        "filters": {"type": "object", "properties": FILTERS},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        **_json({"$ref": "#/components/schemas/SearchResult"}),
                        **_errors(400, 401, 404, 422, 503),
                    },
                }
            },
            "/api/v1/encoders": {
                "get": {
                    "summary": "The encoders a search may name (encoders: [{name, architecture, target_mpp, tile_px, ...}], default)",
                    "responses": {**_json({"type": "object"}), **_errors(401)},
                }
            },
            "/api/v1/slides": {
                "get": {
                    "summary": "List slides of the archive (filter and page)",
                    "parameters": [
                        _str_param("status", "pending, indexed or failed"),
                        _str_param("q", "text in path, patient, label or diagnosis"),
                        _str_param("site"),
                        _str_param("diagnosis"),
                        _str_param("collection"),
                        _int_param("page"),
                        _int_param("per_page"),
                    ],
                    "responses": {
                        **_json(
                            {
                                "type": "object",
                                "properties": {
                                    "slides": {"type": "array", "items": {"$ref": "#/components/schemas/Slide"}},
                                    "total": {"type": "integer"},
                                    "page": {"type": "integer"},
                                    "per_page": {"type": "integer"},
                                    "pages": {"type": "integer"},
                                },
                            }
                        ),
                        **_errors(400, 401),
                    },
                }
            },
            "/api/v1/slides/{slide_id}": {
                "get": {
                    "summary": "One slide's metadata and status",
                    "parameters": [slide_id],
                    "responses": {**_json({"$ref": "#/components/schemas/Slide"}), **_errors(401, 404)},
                }
            },
            "/api/v1/slides/{slide_id}/region.jpg": {
                "get": {
                    "summary": "A level-0 box of a slide as JPEG (matched-region thumbnails)",
                    "parameters": [
                        slide_id,
                        _int_param("x"),
                        _int_param("y"),
                        _int_param("w"),
                        _int_param("h"),
                        _int_param("px", description="longest edge of the JPEG (16-1024)"),
                    ],
                    "responses": {**_image("the region"), **_errors(400, 401, 404, 422)},
                }
            },
            "/api/v1/slides/{slide_id}/thumbnail.jpg": {
                "get": {
                    "summary": "Thumbnail of a whole slide",
                    "parameters": [slide_id, _int_param("px")],
                    "responses": {**_image("the thumbnail"), **_errors(400, 401, 404, 422)},
                }
            },
            "/api/v1/benchmarks": {
                "get": {
                    "summary": "Retrieval benchmark runs",
                    "responses": {
                        **_json(
                            {
                                "type": "object",
                                "properties": {
                                    "runs": {"type": "array", "items": {"$ref": "#/components/schemas/BenchmarkRun"}}
                                },
                            }
                        ),
                        **_errors(401),
                    },
                }
            },
            "/api/v1/benchmarks/{run_id}": {
                "get": {
                    "summary": "One benchmark run",
                    "parameters": [_int_param("run_id", "path")],
                    "responses": {**_json({"$ref": "#/components/schemas/BenchmarkRun"}), **_errors(401, 404)},
                }
            },
            "/api/v1/mil/{run_id}/slides/{slide_id}/attention": {
                "get": {
                    "summary": "A slide's class probabilities and per-tile attention under a MIL run (`engine mil train`): the viewer's heat map",
                    "parameters": [
                        _int_param("run_id", "path", description="id of a benchmark run of kind mil"),
                        slide_id,
                    ],
                    "responses": {
                        **_json(
                            {
                                "type": "object",
                                "properties": {
                                    "run": {"type": "integer"},
                                    "label_column": {"type": ["string", "null"]},
                                    "classes": {"type": "array", "items": {"type": "string"}},
                                    "probabilities": {"type": "object"},
                                    "prediction": {"type": "string"},
                                    "tiles": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "x": {"type": "integer"},
                                                "y": {"type": "integer"},
                                                "size": {"type": "integer"},
                                                "attention": {"type": "number"},
                                                "rank": {
                                                    "type": "number",
                                                    "description": "attention percentile within the slide, 1 = most attended",
                                                },
                                            },
                                        },
                                    },
                                },
                            }
                        ),
                        **_errors(401, 404, 409, 422),
                    },
                }
            },
            "/api/v1/me": {
                "get": {"summary": "The authenticated user", "responses": {**_json({"type": "object"}), **_errors(401)}}
            },
            "/api/v1/openapi.json": {"get": {"summary": "This document", "responses": _json({"type": "object"})}},
            "/tiles/{slide_id}.dzi": {
                "get": {
                    "summary": "Deep-zoom (DZI) descriptor of a slide, for OpenSeadragon",
                    "parameters": [slide_id],
                    "responses": {
                        "200": {"description": "DZI XML", "content": {"application/xml": {}}},
                        **_errors(401, 404, 422),
                    },
                }
            },
            "/tiles/{slide_id}_files/{level}/{col}_{row}.jpeg": {
                "get": {
                    "summary": "One deep-zoom tile (256 px JPEG)",
                    "parameters": [
                        slide_id,
                        _int_param("level", "path"),
                        _int_param("col", "path"),
                        _int_param("row", "path"),
                    ],
                    "responses": {**_image("the tile"), **_errors(401, 404, 422)},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "API token from `histoseek-web users token NAME`",
                },
                "session": {"type": "apiKey", "in": "cookie", "name": "session"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                },
                "Slide": {
                    "type": "object",
                    "properties": {
                        k: {"type": ["string", "null"]}
                        for k in (
                            "name",
                            "path",
                            "status",
                            "error",
                            "patient",
                            "site",
                            "diagnosis",
                            "label",
                            "collection",
                            "vendor",
                            "mpp_source",
                            "indexed_at",
                        )
                    }
                    | {
                        "id": {"type": "integer"},
                        "mpp": {"type": ["number", "null"]},
                        "width": {"type": ["integer", "null"]},
                        "height": {"type": ["integer", "null"]},
                        "tile_count": {"type": "integer"},
                        "extra": {"type": "object"},
                    },
                },
                "Region": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer"},
                        "y": {"type": "integer"},
                        "w": {"type": "integer"},
                        "h": {"type": "integer"},
                        "score": {"type": "number"},
                        "match": {"type": "string", "enum": ["features", "pixels"]},
                    },
                    "description": "level-0 pixel box of a match: 'features' = a tile matched by encoder features (score: cosine similarity); 'pixels' = the query region itself registered on the slide (score: normalised cross-correlation), listed first",
                },
                "SearchResult": {
                    "type": "object",
                    "properties": {
                        "query": {
                            "type": "object",
                            "description": "what was searched; a region query also has mpp (given or estimated), mpp_given, pixel_check {slides, of, budget_s, stopped_by_budget} (slides verified on pixels; a verified copy ranks first) and, when the resolution was not given, scale {estimated_mpp, evidence ('features' or 'pixels'), candidates [{mpp, score, tiles}]}",
                        },
                        "results": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "rank": {"type": "integer"},
                                    "score": {"type": "number"},
                                    "slide": {
                                        "type": "object",
                                        "properties": {
                                            "id": {"type": "integer"},
                                            "path": {"type": "string"},
                                            "patient": {"type": ["string", "null"]},
                                            "site": {"type": ["string", "null"]},
                                            "diagnosis": {"type": ["string", "null"]},
                                            "label": {"type": ["string", "null"]},
                                        },
                                    },
                                    "regions": {"type": "array", "items": {"$ref": "#/components/schemas/Region"}},
                                },
                            },
                        },
                        "suggestion": {
                            "type": ["object", "null"],
                            "properties": {"label": {"type": ["string", "null"]}, "votes": {"type": "object"}},
                        },
                        "timing_ms": {"type": "object"},
                        "degraded": {
                            "type": "boolean",
                            "description": "true when some shards are quarantined or slides missing: the results come from the rest of the index",
                        },
                        "warnings": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "what was left out of this search and what to run about it",
                        },
                    },
                },
                "BenchmarkRun": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "dataset_kind": {"type": "string"},
                        "dataset_path": {"type": "string"},
                        "encoder_name": {"type": "string"},
                        "encoder_sha256": {"type": ["string", "null"]},
                        "parameters": {"type": "object"},
                        "metrics": {"type": "object"},
                        "created_at": {"type": "string"},
                    },
                },
            },
        },
    }
