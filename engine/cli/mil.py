"""`engine mil train|predict`: slide classification with gated attention MIL on the tile
features already in the index (engine/mil)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from engine.cli.common import handle_errors, run_edge, settings_options
from engine.config import Settings


def index_options(func):
    """--data-dir, --catalog, --index-dir, --device: `train` takes no encoder checkpoint (its
    --encoder names which indexed features to use), so it declares these itself."""

    @click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder of the default catalog and index [env HISTOSEEK_DATA_DIR].",
    )
    @click.option(
        "--catalog", "catalog_url", default=None, metavar="URL", help="Catalog database URL [env HISTOSEEK_CATALOG]."
    )
    @click.option(
        "--index-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder of FAISS shard files [env HISTOSEEK_INDEX_DIR].",
    )
    @click.option(
        "--device", default=None, help="auto (CUDA when present), cpu, cuda or cuda:N [env HISTOSEEK_DEVICE]."
    )
    @functools.wraps(func)
    def wrapper(*args, data_dir, catalog_url, index_dir, device, **kwargs):
        kwargs["settings"] = run_edge(
            Settings.load, data_dir=data_dir, catalog_url=catalog_url, index_dir=index_dir, device=device
        )
        return func(*args, **kwargs)

    return wrapper


@click.group("mil")
def mil_command() -> None:
    """Slide classifiers (attention MIL) trained on the indexed tile features."""


@mil_command.command("train")
@click.option(
    "--label-column",
    required=True,
    help="Slide metadata giving the class: diagnosis, site, label, collection, or a key of the metadata CSV's extra columns.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder (resumable: rerun with the same --out to finish an interrupted run).",
)
@click.option(
    "--folds", default=5, show_default=True, help="Cross-validation folds (fewer when a class has fewer patients)."
)
@click.option(
    "--group",
    type=click.Choice(["patient", "slide"]),
    default="patient",
    show_default=True,
    help="What never splits across training and test: a patient's slides, or each slide alone.",
)
@click.option(
    "--encoder",
    "index_encoder",
    default=None,
    metavar="NAME|SHA",
    help="Which indexed encoder's features to use: its name or a sha256 prefix (`indexer status` lists them) [default: the only one].",
)
@click.option(
    "--epochs",
    default=40,
    show_default=True,
    help="Most epochs per fold (early stopping on the validation split usually ends sooner).",
)
@click.option(
    "--patience", default=6, show_default=True, help="Epochs without a better validation loss before stopping."
)
@click.option("--lr", default=5e-4, show_default=True)
@click.option("--hidden", default=256, show_default=True, help="Width of the projected tile features.")
@click.option(
    "--max-tiles",
    type=int,
    default=None,
    help="Train on a random subset of this many tiles per slide and epoch (faster on big slides) [default: all].",
)
@click.option("--no-instance-loss", is_flag=True, help="Plain attention MIL, without CLAM's instance clustering loss.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--no-store",
    is_flag=True,
    help="Do not record the run in the catalog (the web Benchmarks page lists recorded runs).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@index_options
@handle_errors
def train(
    label_column,
    out,
    folds,
    group,
    index_encoder,
    epochs,
    patience,
    lr,
    hidden,
    max_tiles,
    no_instance_loss,
    seed,
    no_store,
    quiet,
    settings: Settings,
) -> None:
    """Cross-validated gated attention MIL (CLAM-SB-like) on the indexed, labelled slides.

    Reads every labelled slide's tile features from the index (no re-embedding), folds by
    patient, early-stops on a validation split inside each training fold, and writes
    checkpoints, report.json and roc.png to --out. Example:

    \b
        engine mil train --label-column diagnosis --folds 5 --out runs/diagnosis
    """
    from engine.mil import MilOptions, load_bags, train_run
    from engine.mil.report import store_run, text_summary
    from engine.mil.train import TrainOptions

    bags = load_bags(
        settings.catalog_url, settings.index_dir, label_column, encoder=index_encoder, group=group, progress=not quiet
    )
    counts = ", ".join(f"{c}: {int((bags.y == i).sum())}" for i, c in enumerate(bags.classes))
    click.echo(
        f"{len(bags.bags)} slides of {len(set(bags.groups))} {group}s ({counts}); features of {bags.contract.encoder_name}, {bags.contract.dim}-d",
        err=True,
    )
    topts = TrainOptions(
        max_epochs=epochs,
        patience=patience,
        lr=lr,
        hidden=hidden,
        max_tiles=max_tiles,
        instance_loss=not no_instance_loss,
    )
    device = settings.device
    report = train_run(
        bags, out, MilOptions(folds=folds, group=group, seed=seed, device=device, progress=not quiet, train=topts)
    )
    if not no_store:
        params = {
            "label_column": label_column,
            "group": group,
            "folds": len(report["metrics"]["folds"]),
            "classes": list(bags.classes),
            "counts": report["counts"],
            "notes": report["notes"],
            "options": report["options"],
            "run_dir": report["run_dir"],
        }
        run_id = store_run(
            settings.catalog_url,
            Path(report["run_dir"]),
            bags.contract.to_json(),
            params,
            report["metrics"],
            Path(report["plot"]),
        )
        click.echo(f"recorded as benchmark run {run_id} (kind mil) in the catalog", err=True)
    for note in report["notes"]:
        click.echo(f"Note: {note}", err=True)
    click.echo(
        f"wrote {report['run_dir']}/report.json and roc.png ({report['train_seconds']:.1f} s training on {report['device']})",
        err=True,
    )
    click.echo(text_summary(report["metrics"]))


@mil_command.command("predict")
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="A run folder of `engine mil train`.",
)
@click.option(
    "--slide",
    "slide",
    required=True,
    metavar="ID|PATH",
    help="Catalog id of an indexed slide, or a slide file (embedded on the fly with --encoder when not indexed).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write probabilities and every tile's attention here.",
)
@click.option("--top", default=5, show_default=True, help="Most attended tiles to print.")
@click.option(
    "--default-mpp", type=float, default=None, help="A slide file without resolution metadata: its microns per pixel."
)
@settings_options
@handle_errors
def predict(run_dir, slide, json_path, top, default_mpp, settings: Settings) -> None:
    """Class probabilities and per-tile attention of one slide (mean of the run's fold models)."""
    import sqlalchemy as sa

    from engine.catalog.db import Catalog
    from engine.catalog.models import Slide
    from engine.files import atomic_write_text
    from engine.mil.predict import load_run, predict_file, predict_indexed
    from engine.slides import fingerprint

    run = load_run(run_dir, settings.device)
    catalog = Catalog(settings.catalog_url)
    try:
        slide_id = int(slide) if slide.isdigit() else None
        if slide_id is None:
            path = Path(slide)
            if not path.is_file():
                raise click.BadParameter(f"{slide}: neither a slide id nor a slide file")
            with catalog.session() as s:
                slide_id = s.scalar(
                    sa.select(Slide.id).where(Slide.fingerprint == fingerprint(path), Slide.status == "indexed")
                )
        if slide_id is not None:
            answer = predict_indexed(catalog, settings.index_dir, run, slide_id)
        else:
            answer = predict_file(
                Path(slide), run, settings.require_encoder(), device=settings.device, default_mpp=default_mpp
            )
    finally:
        catalog.dispose()
    if json_path:
        atomic_write_text(Path(json_path), json.dumps(answer, indent=1))
        click.echo(f"wrote {json_path}", err=True)
    probs = "  ".join(f"{c}: {p:.3f}" for c, p in answer["probabilities"].items())
    click.echo(f"{answer['slide']['name']}: {answer['prediction']}   ({probs}; mean of {answer['models']} fold models)")
    best = sorted(answer["tiles"], key=lambda t: -t["attention"])[:top]
    click.echo(f"most attended tiles of {len(answer['tiles'])} (level-0 x, y, size: attention):")
    for t in best:
        click.echo(f"  {t['x']}, {t['y']}, {t['size']}: {t['attention']:.4f}")
