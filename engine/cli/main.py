"""`engine`: features, search, benchmark and catalog commands (click)."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.benchmark import benchmark_command
from engine.cli.common import handle_errors, settings_options, setup_logging
from engine.cli.mil import mil_command
from engine.cli.search import search_command
from engine.config import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More logging.")
@click.version_option(package_name="histoseek")
def main(verbose: int) -> None:
    """histoseek engine: embed tiles with RetCCL, search the archive, benchmark retrieval.

    Settings come from flags, then HISTOSEEK_* environment variables, then defaults
    (a SQLite catalog and shard index under ~/.local/share/histoseek).
    """
    setup_logging(verbose)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output .npy file (N x D float32); a sidecar .json lists the image of each row.",
)
@click.option("--batch-size", default=64, show_default=True, help="Images per encoder batch.")
@click.option("--workers", type=int, default=None, help="Decoding worker processes [default: cores - 1].")
@click.option(
    "--skip-bad", is_flag=True, help="Record unreadable images in the sidecar and go on, instead of stopping."
)
@settings_options(int8=True)
@handle_errors
def features(inputs, out, batch_size, workers, skip_bad, settings: Settings) -> None:
    """Raw (not normalised) encoder features of IMAGES_OR_DIRS, in sorted path order.

    Folders are searched recursively for .png/.jpg/.tif/... files. Images that are not
    224x224 are resized to it. Example:

        engine features tiles/ --encoder best_ckpt.pth --out feats.npy
    """
    from engine.encoder import Encoder
    from engine.features import compute_features, write_features
    from engine.images import find_images

    paths = find_images(list(inputs))
    if not paths:
        raise click.ClickException("no images found in the given files or folders")
    encoder = Encoder.from_spec(settings.require_encoder(), device=settings.device, precision=settings.precision)
    click.echo(f"encoder: {encoder.info.describe()} on {encoder.device}, precision {encoder.precision}", err=True)
    result = compute_features(encoder, paths, batch_size=batch_size, workers=workers, skip_bad=skip_bad)
    written = write_features(result, Path(out), encoder)
    click.echo(
        f"wrote {len(result.paths)} x {encoder.dim} features to {written}"
        + (f" ({len(result.skipped)} unreadable images skipped, listed in the sidecar)" if result.skipped else "")
    )


@main.group()
def db() -> None:
    """Catalog database maintenance."""


@db.command("upgrade")
@settings_options
@handle_errors
def db_upgrade(settings: Settings) -> None:
    """Create the catalog or bring its schema to the newest migration."""
    from engine.catalog.db import upgrade

    upgrade(settings.catalog_url)
    click.echo(f"catalog schema is up to date: {settings.catalog_url}")


main.add_command(benchmark_command)
main.add_command(search_command)
main.add_command(mil_command)


if __name__ == "__main__":
    main()
