"""`engine search`: query the archive with a region image or a whole slide."""

from __future__ import annotations

import json
from pathlib import Path

import click

from engine.cli.common import handle_errors, settings_options
from engine.config import Settings
from engine.index import INDEX_KINDS
from engine.search.filters import FILTER_FIELDS


def filter_options(command):
    """--site, --diagnosis, ...: one option per search filter field (engine.search.filters)."""
    for field in reversed(FILTER_FIELDS):
        command = click.option(f"--{field}", field, default=None, help=f"Only slides whose {field} is this.")(command)
    return command


def format_table(result: dict) -> str:
    """The human-readable view of a search result: one line per slide, then the vote."""
    q = result["query"]
    if q["type"] == "region":
        head = f"region {q['width']}x{q['height']} px at {q['mpp']:.3g} um/px -> {q['tiles']} query tile(s) at {q['index_mpp']:g} um/px"
        scale = q.get("scale")
        if scale:  # no --mpp: estimated (engine.search.scale)
            cands = ", ".join(f"{c['mpp']:g}: {c['score']:.3f}" for c in scale["candidates"])
            head += f"\nmpp estimated {scale['estimated_mpp']:.3g} um/px (evidence: {scale['evidence']}; candidate scores {cands})"
        check = q.get("pixel_check")
        if check and check["stopped_by_budget"]:
            head += f"\npixel check: {check['slides']} of {check['of']} candidate slides tried within {check['budget_s']:g} s"
    else:
        head = (
            f"slide {q['slide_id'] if q['slide_id'] is not None else q['path']} -> mosaic of {len(q['mosaic'])} tiles"
        )
    enc = q.get("encoder")  # which of the archive's encoders answered
    lines = [head + f" ({q['index']} index" + (f", encoder {enc['name']})" if enc else ")"), ""]
    for warning in result.get("warnings", []):  # quarantined shards, missing slide files
        lines.insert(1, f"warning: {warning}")
    lines.append(
        f"{'rank':>4}  {'score':>8}  {'id':>5}  {'label / diagnosis':<24} {'site':<14} {'patient':<16} {'best region (x, y, w, h)':<28} file"
    )
    for r in result["results"]:
        s = r["slide"]
        label = s["label"] or s["diagnosis"] or "-"
        box = r["regions"][0] if r["regions"] else None
        where = f"{box['x']}, {box['y']}, {box['w']}, {box['h']}" if box else "-"
        if box and box.get("match") == "pixels":
            where += " exact"  # the region is a copy of this spot (engine.search.localise)
        lines.append(
            f"{r['rank']:>4}  {r['score']:>8.4f}  {s['id']:>5}  {label[:24]:<24} {(s['site'] or '-')[:14]:<14} {(s['patient'] or '-')[:16]:<16} {where:<28} {Path(s['path']).name}"
        )
    if not result["results"]:
        lines.append("  (no slide matches the filters)")
    sug = result["suggestion"]
    lines.append("")
    if sug["label"]:
        votes = ", ".join(f"{k}: {v}" for k, v in sorted(sug["votes"].items(), key=lambda kv: -kv[1]))
        lines.append(f"suggestion (majority of the top {len(result['results'])}): {sug['label']}  [{votes}]")
    else:
        lines.append("suggestion: none (the result slides carry no labels)")
    lines.append("time: " + ", ".join(f"{k} {v:.0f} ms" for k, v in result["timing_ms"].items()))
    return "\n".join(lines)


@click.command("search")
@click.option(
    "--image",
    type=click.Path(dir_okay=False),
    default=None,
    help="A region image (PNG, JPEG, TIFF, ...) to search for.",
)
@click.option(
    "--mpp",
    type=float,
    default=None,
    help="Microns per pixel of --image [default: unknown, estimated from the archive at 0.25 - 2 um/px].",
)
@click.option(
    "--magnification",
    type=float,
    default=None,
    help="Objective magnification of --image instead of --mpp (20 -> 0.5 um/px).",
)
@click.option(
    "--slide",
    default=None,
    metavar="PATH_OR_ID",
    help="A whole slide to search with: the id of an indexed slide, or a slide file (indexed or not).",
)
@click.option(
    "--default-mpp", type=float, default=None, help="Microns per pixel of a --slide file without resolution metadata."
)
@click.option("--top-k", type=click.IntRange(1, 1000), default=10, show_default=True, help="Slides to return.")
@filter_options
@click.option("--exclude-slide", type=int, default=None, help="Leave this slide id out of a region search.")
@click.option("--exclude-patient", default=None, help="Leave this patient's slides out of a region search.")
@click.option("--include-self", is_flag=True, help="Let a --slide search return the query slide itself.")
@click.option(
    "--index-kind",
    type=click.Choice(INDEX_KINDS),
    default="auto",
    show_default=True,
    help="auto: exact up to 20k tiles, compressed (IVF-PQ + exact re-ranking) above.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (level-0 pixel boxes).")
@settings_options
@handle_errors
def search_command(
    image,
    mpp,
    magnification,
    slide,
    default_mpp,
    top_k,
    exclude_slide,
    exclude_patient,
    include_self,
    index_kind,
    as_json,
    settings: Settings,
    **filter_values,
) -> None:
    """Find the archived slides most similar to a region image or a whole slide.

    Examples:

    \b
        engine search --image crop.png --mpp 0.5 --top-k 5
        engine search --image screenshot.jpg          (mpp estimated; the index's encoder)
        engine search --image crop.jpg --magnification 20 --site colon --json
        engine search --slide 12
        engine search --slide new_case.svs --default-mpp 0.25

    Each result names the slide, its score (cosine similarity, 1 = identical), its labels,
    and where in it the match is (level-0 pixel box); the suggestion is the majority label
    of the results; a slide the region is a pixel copy of ranks first ("exact"). Without --mpp
    or --magnification the region's scale is estimated (the query's `scale` in --json). Uses
    the catalog and index of `indexer build` (same --catalog and --index-dir options and
    HISTOSEEK_* environment), and the encoder the index was built with unless --encoder or
    HISTOSEEK_ENCODER names one: an archive indexed with several encoders is searched with the
    one named (its name as `indexer status` shows it, or a sha256 prefix), and asks for one
    when none is.
    """
    if (image is None) == (slide is None):
        raise click.UsageError("give exactly one of --image PATH or --slide PATH_OR_ID")
    if image is None and (mpp is not None or magnification is not None):
        raise click.UsageError("--mpp and --magnification describe an --image, not a --slide")
    if mpp is not None and magnification is not None:
        raise click.UsageError("give --mpp or --magnification, not both")
    from engine.errors import EncoderError
    from engine.images import open_rgb
    from engine.search import SearchEngine

    filters = {k: v for k, v in filter_values.items() if v}
    query_image = open_rgb(image) if image is not None else None
    try:
        engine = SearchEngine(settings, index_kind=index_kind, progress=True)
    except EncoderError as exc:
        if "--encoder" in str(exc):  # the message already says how to choose
            raise
        raise EncoderError(f"{exc} (the encoder is chosen with --encoder NAME_OR_SPEC or HISTOSEEK_ENCODER)") from None
    if query_image is not None:
        result = engine.search_region(
            query_image,
            mpp=mpp,
            magnification=magnification,
            top_k=top_k,
            filters=filters,
            exclude_slide_id=exclude_slide,
            exclude_patient=exclude_patient,
        )
    else:
        result = engine.search_slide(
            slide, top_k=top_k, filters=filters, exclude_self=not include_self, default_mpp=default_mpp
        )
    doc = result.to_json()
    click.echo(json.dumps(doc, indent=1) if as_json else format_table(doc))
