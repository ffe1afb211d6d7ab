"""HTML pages: search, results, slide viewer, archive, benchmark runs, audit log, account."""

from __future__ import annotations

import base64
import io
import math

from flask import Blueprint, Response, abort, current_app, flash, g, render_template, request, send_file, url_for
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import HTTPException

from engine.catalog.models import SLIDE_STATUSES
from engine.errors import ImageError, NotFound, QueryError
from engine.search.filters import FILTER_FIELDS
from webapp import archive, mil, plots, users
from webapp.errors import message_for, status_for
from webapp.examples import find_example, list_examples
from webapp.queries import MAGNIFICATIONS
from webapp.searching import region_search, slide_search
from webapp.state import state

bp = Blueprint("pages", __name__)

# Client mistakes that send the user back to the search form with a message, instead of an
# error page; the form keeps what they entered.
FORM_ERRORS = (QueryError, ImageError, NotFound)
# Largest level-0 coordinate a viewer box may have.
MAX_BOX_COORD = 2**31
# Largest archive page number (an offset beyond the database's integers was a 500).
MAX_PAGE = 10**6


def _search_form(status: int = 200):
    catalog = state().catalog
    encoders = state().encoder_choices()  # several: a selector in both forms
    return render_template(
        "search.html",
        examples=list_examples(current_app.config["EXAMPLES_DIR"]),
        slides=archive.indexed_slides(catalog),
        choices=archive.filter_choices(catalog),
        magnifications=MAGNIFICATIONS,
        form=request.form if request.method == "POST" else request.args,
        filter_fields=FILTER_FIELDS,
        encoders=encoders,
        default_encoder=state().default_encoder(encoders) if len(encoders) > 1 else None,
    ), status


def _form_error(exc: Exception):
    if isinstance(exc, HTTPException):
        if exc.code not in (400, 404, 413, 415, 422):
            raise exc
        flash(exc.description, "error")
        return _search_form(exc.code)
    flash(message_for(exc), "error")
    return _search_form(status_for(exc))


def _query_thumbnail(image) -> str:
    """The uploaded region, as decoded for the search, as a small inline JPEG for the
    results page (never stored). Shrinks `image` in place: the search is done with it."""
    image.thumbnail((192, 192))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@bp.get("/")
def search():
    return _search_form()


@bp.get("/examples/<name>")
def example_image(name: str):
    """An example region's image, for the search page's thumbnails."""
    _, path = find_example(current_app.config["EXAMPLES_DIR"], name)
    return send_file(path, max_age=3600)


@bp.get("/search/example/<name>")
def search_example(name: str):
    """Search with an example region, as if it had been uploaded with its resolution."""
    example, path = find_example(current_app.config["EXAMPLES_DIR"], name)
    with open(path, "rb") as fh:
        storage = FileStorage(stream=fh, filename=path.name)
        return _region_results(storage, MultiDict(example.form_values()), example.title)


@bp.post("/search/region")
def search_region():
    storage = request.files.get("image")
    return _region_results(storage, request.form, storage.filename if storage else "")


def _region_results(storage, values, name: str):
    """The results page of a region search, or the form again with what went wrong."""
    try:
        result, image = region_search(storage, values)
    except (HTTPException, *FORM_ERRORS) as exc:
        return _form_error(exc)
    return render_template(
        "results.html", result=result, query_kind="region", query_image=_query_thumbnail(image), query_name=name
    )


@bp.get("/search/slide")
def search_slide():
    try:
        result = slide_search(request.args)
        query_slide = archive.get_slide(state().catalog, int(request.args["slide_id"]))
    except (HTTPException, *FORM_ERRORS) as exc:
        return _form_error(exc)
    return render_template(
        "results.html", result=result, query_kind="slide", query_slide=archive.slide_json(query_slide)
    )


def _boxes() -> list[dict]:
    """Matched regions passed to the viewer as repeated `box=x,y,w,h[,score[,match]]`
    arguments; match is how the box was found, "features" (default) or "pixels" (the
    query's own pixels registered on the slide: drawn distinctly)."""
    boxes = []
    for raw in request.args.getlist("box")[:100]:
        parts = raw.split(",")
        bad = f"bad box {raw[:60]!r}: expected x,y,w,h[,score[,match]] in level-0 pixels, match 'features' or 'pixels'"
        try:
            numbers = [float(p) for p in parts[:4]]
            # inf made int() raise OverflowError (a 500); no slide is 2**31 pixels wide
            if len(numbers) < 4 or not all(math.isfinite(n) and abs(n) < MAX_BOX_COORD for n in numbers):
                abort(400, description=bad)
            x, y, w, h = (int(n) for n in numbers)
            score = float(parts[4]) if len(parts) > 4 and parts[4] else None
        except ValueError:
            abort(400, description=bad)
        if score is not None and not math.isfinite(score):
            score = None  # the score is only shown; a NaN in the page's JSON stopped the viewer
        match = parts[5] if len(parts) > 5 else "features"
        if len(parts) < 4 or w <= 0 or h <= 0 or match not in ("features", "pixels"):
            abort(400, description=bad)
        boxes.append({"x": x, "y": y, "w": w, "h": h, "score": score, "match": match})
    return boxes


@bp.get("/viewer/<int:slide_id>")
def viewer(slide_id: int):
    slide = archive.slide_json(archive.get_slide(state().catalog, slide_id))
    users.record(state().catalog, g.user.id, "view_slide", {"slide_id": slide_id})
    return render_template(
        "viewer.html",
        slide=slide,
        boxes=_boxes(),
        dzi_url=url_for("tiles.dzi", slide_id=slide_id),
        mil_runs=mil.runs_for_slide(state().catalog, slide_id),
    )


@bp.get("/archive")
def archive_page():
    try:
        page_no = min(MAX_PAGE, max(1, int(request.args.get("page", 1))))
    except ValueError:
        page_no = 1
    status = request.args.get("status") or None
    if status is not None and status not in SLIDE_STATUSES:
        abort(400, description=f"status must be one of {', '.join(SLIDE_STATUSES)}")
    catalog = state().catalog
    page = archive.list_slides(
        catalog,
        status=status,
        q=request.args.get("q") or None,
        site=request.args.get("site") or None,
        diagnosis=request.args.get("diagnosis") or None,
        collection=request.args.get("collection") or None,
        page=page_no,
        per_page=int(current_app.config["SLIDES_PER_PAGE"]),
    )
    return render_template(
        "archive.html",
        page=page,
        slides=[archive.slide_json(r) for r in page.items],
        counts=archive.status_counts(catalog),
        choices=archive.filter_choices(catalog),
        statuses=SLIDE_STATUSES,
        args=request.args,
    )


@bp.get("/benchmarks")
def benchmarks():
    everything = [archive.benchmark_json(r) for r in archive.list_benchmarks(state().catalog)]
    runs = [run for run in everything if not mil.is_mil(run)]
    for run in runs:
        run["overall"] = plots.overall(run["metrics"])
    columns = sorted({k for run in runs for k in run["overall"]}, key=_metric_order)
    mil_runs = mil.summary_rows([run for run in everything if mil.is_mil(run)])
    return render_template(
        "benchmarks.html",
        runs=runs,
        columns=columns,
        percent=plots.percent,
        mil_runs=mil_runs,
        comparisons=plots.comparisons(runs),
    )


@bp.get("/benchmarks/<int:run_id>")
def benchmark(run_id: int):
    run = archive.benchmark_json(archive.get_benchmark(state().catalog, run_id))
    if mil.is_mil(run):
        return render_template("mil_run.html", run=run, row=mil.summary_rows([run])[0], metrics=run["metrics"])
    metrics = run["metrics"]
    overall = plots.overall(metrics)
    classes = plots.per_class(metrics)
    class_columns = sorted({k for values in classes.values() for k in values if k != "count"}, key=_metric_order)
    return render_template(
        "benchmark.html",
        run=run,
        overall=sorted(overall.items(), key=lambda kv: _metric_order(kv[0])),
        classes=classes,
        class_columns=class_columns,
        svm=plots.svm(metrics),
        has_plot=bool(plots.curves(metrics)),
        percent=plots.percent,
    )


@bp.get("/benchmarks/<int:run_id>/plot.png")
def benchmark_plot(run_id: int):
    run = archive.get_benchmark(state().catalog, run_id)
    if mil.is_mil(run):
        png = plots.roc_plot_png(
            f"MIL run {run.id}: {(run.parameters or {}).get('label_column', '')}", run.metrics or {}
        )
        if png is None:
            raise NotFound(f"MIL run {run_id} has no ROC curve to plot")
        return Response(png, mimetype="image/png")
    png = plots.metrics_plot_png(f"{run.dataset_kind} · {run.encoder_name}", run.metrics or {})
    if png is None:
        raise NotFound(f"benchmark run {run_id} has no metric@k values to plot")
    return Response(png, mimetype="image/png")


def _metric_order(name: str):
    """acc@1, acc@3, acc@5, mv@1, ... : by metric name, then by k as a number."""
    base, _, k = name.partition("@")
    return (base, int(k) if k.isdigit() else 0, name)


@bp.get("/audit")
def audit():
    if not g.user.is_admin:
        abort(403, description="only administrators can read the audit log")
    return render_template("audit.html", events=archive.audit_events(state().catalog))


@bp.route("/account", methods=["GET", "POST"])
def account():
    token = None
    if request.method == "POST":
        token = users.issue_token(state().catalog, g.user.username)
        flash("A new API token was created; it replaces the old one and is shown only once.", "info")
    return render_template("account.html", token=token)


@bp.app_template_filter("viewer_url")
def viewer_url(result: dict) -> str:
    boxes = [
        f"{r['x']},{r['y']},{r['w']},{r['h']},{r['score']:.4f},{r.get('match', 'features')}"
        for r in result.get("regions", [])
    ]
    return url_for("pages.viewer", slide_id=result["slide"]["id"], box=boxes)


@bp.app_template_filter("slide_name")
def slide_name(path: str | None) -> str:
    return (path or "").replace("\\", "/").rsplit("/", 1)[-1]
