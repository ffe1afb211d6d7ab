"""`indexer`: build, inspect, verify and prune the searchable index of a slide archive."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from engine.catalog.models import FAILED, INDEXED, MISSING, PENDING, SLIDE_STATUSES
from engine.cli.common import handle_errors, run_edge, settings_options, setup_logging
from engine.config import Settings


def _rank_from_env() -> int | None:
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More logging.")
@click.version_option(package_name="histoseek")
def main(verbose: int) -> None:
    """histoseek indexer: turn a folder of whole-slide images into a searchable archive.

    Settings come from flags, then HISTOSEEK_* environment variables, then defaults (a
    SQLite catalog and shard index under ~/.local/share/histoseek). Typical use:

    \b
        indexer build /data/slides --metadata slides.csv --encoder best_ckpt.pth
        indexer status
        indexer verify
    """
    setup_logging(verbose, rank=_rank_from_env())


def tiling_options(func):
    """The tiling options `build` and `preview` share, so a preview shows what a build with
    the same flags embeds."""
    options = [
        click.option(
            "--target-mpp",
            type=click.FloatRange(min=0.01, max=100),
            default=None,
            help="Microns per pixel tiles are embedded at [env HISTOSEEK_TARGET_MPP; default: the encoder's own, a card's mpp, 1.0 for RetCCL].",
        ),
        click.option(
            "--tile-px",
            type=click.IntRange(min=16),
            default=None,
            help="Tile edge in pixels at --target-mpp [env HISTOSEEK_TILE_PX; default: the encoder's input size, 224 for RetCCL].",
        ),
        click.option(
            "--min-tissue",
            type=click.FloatRange(0.0, 1.0),
            default=0.5,
            show_default=True,
            help="Smallest fraction of a tile the tissue mask must cover for the tile to be embedded.",
        ),
        click.option(
            "--default-mpp",
            type=click.FloatRange(min=0.01, max=100),
            default=None,
            help="Microns per level-0 pixel for slides that carry neither mpp nor objective power (otherwise such slides fail).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@click.argument("archive_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--metadata",
    type=click.Path(exists=True, dir_okay=False),
    multiple=True,
    help="Slide metadata, recognised by its header; repeat for several files (merged by slide, then by patient): a GDC sample sheet, a GDC clinical TSV, or a CSV with a column naming each slide file (slide/path/file/filename) and any of patient, site, diagnosis, label, collection (other columns are kept as extra metadata). Without it, a TCGA barcode in a file name gives the patient.",
)
@tiling_options
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Tile-decoding worker processes per rank [default: cores - 1, at most 8].",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Tiles per encoder batch."
)
@click.option("--collection", default=None, help="Collection name for slides whose metadata gives none.")
@click.option(
    "--decoder",
    type=click.Choice(["auto", "openslide", "jpeg"]),
    default=None,
    help="Tile decoding: auto = JPEG tiles of SVS/generic TIFFs decoded on the GPU when the encoder runs on CUDA, else OpenSlide; jpeg = those tiles decoded by torchvision also on CPU (other slides: OpenSlide, with a note) [env HISTOSEEK_DECODER; default auto].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the closing summary as JSON on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in log files).")
@settings_options
@handle_errors
def build(
    archive_dir,
    metadata,
    min_tissue,
    default_mpp,
    workers,
    batch_size,
    collection,
    decoder,
    as_json,
    no_progress,
    settings: Settings,
) -> None:
    """Index every slide under ARCHIVE_DIR (recursively; any format OpenSlide reads).

    Slides are identified by content, so a moved file is not indexed twice and a changed
    file is indexed again. A rerun skips indexed slides, retries failed ones and repairs
    what an interrupted run left. Bad slides get a failed row with the reason and never
    stop the run; the exit status is 1 when any slide failed.

    Several processes or machines (a PostgreSQL catalog is needed for several machines):

    \b
        torchrun --nproc-per-node 4 -m indexer build /data/slides --catalog URL ...
    """
    from indexer.build import build_archive

    if decoder is not None:  # the flag over HISTOSEEK_DECODER (a choice: nothing to check)
        settings = dataclasses.replace(settings, decoder=decoder)
    summary = build_archive(
        settings,
        archive_dir,
        metadata=list(metadata) or None,
        collection=collection,
        min_tissue=min_tissue,
        default_mpp=default_mpp,
        workers=workers,
        batch_size=batch_size,
        progress=not no_progress and sys.stderr.isatty(),
    )
    rank = _rank_from_env()
    if rank not in (None, 0):
        sys.exit(0 if summary.ok else 1)
    for note in summary.notes:
        click.echo(f"note: {note}", err=True)
    for path, error in summary.failures:
        click.echo(f"failed: {path}: {error}", err=True)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=1))
    busy = (
        f", encoder busy {summary.encoder_seconds / summary.seconds:.0%} of the time"
        if summary.tiles and summary.seconds
        else ""
    )
    click.echo(
        f"indexed {summary.indexed} slides ({summary.tiles} tiles, {summary.tiles_per_s:.1f} tiles/s{busy}), "
        f"skipped {summary.skipped} already indexed, failed {summary.failed}",
        err=as_json,
    )
    if not summary.ok:
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document: counts and every slide.")
@click.option("--status", "only", type=click.Choice(SLIDE_STATUSES), default=None, help="Only slides with this status.")
@settings_options
@handle_errors
def status(as_json, only, settings: Settings) -> None:
    """Per slide: id, status (indexed, failed, pending or missing), tiles, path, and the
    error of a failed slide; per encoder: its progress (indexed, pending, failed, missing
    slides), the grid it indexes at and where that came from."""
    from engine.catalog.db import Catalog
    from indexer.status import encoder_grids, slide_statuses, status_counts

    catalog = Catalog(settings.catalog_url)
    try:
        rows = slide_statuses(catalog, only)
        encoders = encoder_grids(catalog)
    finally:
        catalog.dispose()
    counts = status_counts(rows)
    if as_json:
        click.echo(json.dumps({"counts": counts, "encoders": encoders, "slides": rows}, indent=1))
        return
    for enc in encoders:
        p = enc["progress"]
        click.echo(
            f"encoder {enc['name']}: {enc['target_mpp']:g} um/px, {enc['tile_px']} px tiles ({enc['grid_source']}); "
            f"{p[INDEXED]} indexed, {p[PENDING]} pending, {p[FAILED]} failed, {p[MISSING]} missing; {p['tiles']} tiles"
        )
    for r in rows:
        line = f"{r['id']:>6}  {r['status']:<8} {r['tiles']:>7}  {r['path']}"
        if len(encoders) > 1:  # per encoder, where they differ from the slide's own line
            line += "".join(f"\n        {e['encoder']}: {e['status']}, {e['tiles']} tiles" for e in r["encodings"])
        click.echo(line + (f"\n        error: {r['error']}" if r["error"] else ""))
    click.echo(
        f"{counts[INDEXED]} indexed, {counts[FAILED]} failed, {counts[PENDING]} pending, {counts[MISSING]} missing; {counts['tiles']} tiles"
    )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@settings_options
@handle_errors
def verify(as_json, settings: Settings) -> None:
    """Check that the catalog, the shard files and the slide files agree: each shard's
    checksum, count and vectors, no ids without tile rows or tile rows without vectors, tile
    counts of slides, no stray shard, sidecar or temp files, and each slide file still there
    with the content it was indexed from. Damaged shards are quarantined (search leaves them
    out, `indexer build` re-embeds them). Exit status 1 when anything disagrees."""
    from engine.catalog.db import Catalog
    from indexer.verify import verify_index

    catalog = Catalog(settings.catalog_url)
    try:
        report = verify_index(catalog, settings.index_dir, progress=sys.stderr.isatty())
    finally:
        catalog.dispose()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
    else:
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        click.echo(
            f"{report.slides} slides, {report.shards} shards, {report.vectors} vectors: "
            + (
                "catalog, shards and slide files agree"
                if report.ok
                else f"{len(report.problems)} problems (`indexer build` repairs shard problems; missing or changed slide files need restoring or `indexer remove`)"
            )
        )
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("slides", nargs=-1, required=True)
@settings_options
@handle_errors
def remove(slides, settings: Settings) -> None:
    """Remove SLIDES (ids, paths or fingerprints, as `indexer status` shows them) from the
    catalog, with their tiles and shard files. All or nothing."""
    from engine.catalog.db import Catalog
    from indexer.remove import remove_slides

    catalog = Catalog(settings.catalog_url)
    try:
        removed = run_edge(remove_slides, catalog, settings.index_dir, list(slides))
    finally:
        catalog.dispose()
    for path in removed:
        click.echo(f"removed {path}")


@main.command()
@click.argument("slide", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG to write.")
@tiling_options
@click.option(
    "--max-px", type=click.IntRange(min=64), default=1600, show_default=True, help="Longest side of the picture."
)
@handle_errors
def preview(slide, out, target_mpp, tile_px, min_tissue, default_mpp, max_px) -> None:
    """Draw what `indexer build` would embed of SLIDE: its thumbnail, the tissue mask
    (tinted blue) and the kept tiles (green squares). Use it to pick --min-tissue.
    Tile size and resolution are read as `indexer build` reads them (flags, then
    HISTOSEEK_TARGET_MPP / HISTOSEEK_TILE_PX, then defaults)."""
    from indexer.preview import preview_slide

    settings = Settings.load(target_mpp=target_mpp, tile_px=tile_px)
    result = preview_slide(
        slide,
        target_mpp=settings.target_mpp,
        tile_px=settings.tile_px,
        min_tissue=min_tissue,
        default_mpp=default_mpp,
        max_px=max_px,
    )
    result.image.save(out)
    click.echo(
        f"{len(result.tiles)} tiles of {settings.tile_px} px at {settings.target_mpp:g} um/px; tissue covers {result.tissue_fraction:.1%} "
        f"of the slide (mpp {result.mpp:g} from {result.mpp_source}); wrote {out}"
    )


@main.command()
@click.option("--check", is_flag=True, help="Only measure recall@10 on stored vectors and say whether retraining pays.")
@click.option(
    "--convert", "convert_only", is_flag=True, help="Keep the trained index; rewrite its re-ranking store only."
)
@click.option(
    "--store",
    type=click.Choice(["f16", "pca-f16", "pca-sq8"]),
    default="pca-f16",
    show_default=True,
    help="Re-ranking store to convert to (with --convert).",
)
@click.option("--queries", type=click.IntRange(min=10), default=200, show_default=True, help="Tiles the check samples.")
@settings_options
@handle_errors
def reindex(check, convert_only, store, queries, settings: Settings) -> None:
    """Rebuild (train anew and fill), convert (--convert) or check (--check) the compressed
    index of each encoder, online: the new index is built aside and swapped in atomically,
    searches answer from the old one until then. Exit status 1 when --check finds that
    retraining pays."""
    from engine.catalog.db import Catalog
    from indexer.reindex import reindex as run_reindex

    catalog = Catalog(settings.catalog_url)
    try:
        reports = run_reindex(
            catalog,
            settings.index_dir,
            check=check,
            convert_only=convert_only,
            store=store,
            queries=queries,
            progress=sys.stderr.isatty(),
        )
    finally:
        catalog.dispose()
    click.echo(json.dumps(reports, indent=1))
    if check and any(r.get("retrain") or "error" in r for r in reports):
        sys.exit(1)
