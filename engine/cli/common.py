"""Pieces shared by the `engine` and `indexer` command lines: the settings options (same
flags and environment defaults everywhere), logging set-up, and turning HistoseekError into
a clean `click.ClickException` at the edge."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys

import click

from engine.config import Settings
from engine.errors import HistoseekError


def settings_options(func=None, *, int8: bool = False):
    """--data-dir, --catalog, --index-dir, --encoder, --device, --precision on a command;
    the command receives `settings: Settings` instead of those flags.

    int8=True also offers `--precision int8` on that command. Only as a flag, never from
    HISTOSEEK_PRECISION: quantised features must not reach an index or a search by way of
    an environment variable set for another command."""
    if func is None:
        return functools.partial(settings_options, int8=int8)
    choices = ["auto", "fp32", "int8"] if int8 else ["auto", "fp32"]
    precision_help = "auto: fastest numerically safe path; fp32: exact [env HISTOSEEK_PRECISION]." + (
        " int8: post-training int8 on the CPU, faster where there is no native bf16, less exact (flag only; see docs/benchmarks.md)."
        if int8
        else ""
    )

    @click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder for the default catalog, index and weights [env HISTOSEEK_DATA_DIR; default ~/.local/share/histoseek].",
    )
    @click.option(
        "--catalog",
        "catalog_url",
        default=None,
        metavar="URL",
        help="Catalog database URL, e.g. sqlite:///cat.sqlite or postgresql+psycopg://u:p@host/db [env HISTOSEEK_CATALOG].",
    )
    @click.option(
        "--index-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder of FAISS shard files [env HISTOSEEK_INDEX_DIR].",
    )
    @click.option(
        "--encoder",
        default=None,
        metavar="SPEC",
        help="RetCCL checkpoint path (best_ckpt.pth), a `pretrain export` file, an encoder card, or random[:ARCH] for demos; "
        "for search also the name of one of the archive's encoders (`indexer status`) [env HISTOSEEK_ENCODER].",
    )
    @click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [env HISTOSEEK_DEVICE; default auto].")
    @click.option("--precision", type=click.Choice(choices), default=None, help=precision_help)
    @functools.wraps(func)
    def wrapper(*args, data_dir, catalog_url, index_dir, encoder, device, precision, **kwargs):
        overrides = {
            "data_dir": data_dir,
            "catalog_url": catalog_url,
            "index_dir": index_dir,
            "encoder": encoder,
            "device": device,
            "precision": None if precision == "int8" else precision,
        }
        for key in ("target_mpp", "tile_px"):
            if key in kwargs:
                overrides[key] = kwargs.pop(key)
        settings = run_edge(Settings.load, **overrides)
        kwargs["settings"] = dataclasses.replace(settings, precision="int8") if precision == "int8" else settings
        return func(*args, **kwargs)

    return wrapper


def run_edge(func, *args, **kwargs):
    """Call library code, turning our typed errors into a one-line CLI error; a setting the
    error names is given as the option that sets it."""
    try:
        return func(*args, **kwargs)
    except HistoseekError as exc:
        hint = f" (option --{exc.setting.replace('_', '-')})" if exc.setting else ""
        raise click.ClickException(f"{exc}{hint}") from None


def handle_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return run_edge(func, *args, **kwargs)

    return wrapper


def setup_logging(verbose: int = 0, rank: int | None = None) -> None:
    """Log to stderr; INFO by default, DEBUG with -v. With a rank, other ranks than 0 only
    log warnings (no duplicated progress lines under torchrun)."""
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    fmt = (
        "%(levelname)s %(name)s: %(message)s" if rank is None else f"[rank {rank}] %(levelname)s %(name)s: %(message)s"
    )
    handler.setFormatter(logging.Formatter(fmt))
    if rank not in (None, 0):
        handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("alembic", "PIL", "matplotlib", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
