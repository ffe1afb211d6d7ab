"""`engine benchmark`: retrieval benchmark of one or more encoders on a labelled data set."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import handle_errors
from engine.config import Settings
from engine.evaluation.datasets import EXCLUSIONS, KINDS

PROTOCOL_NAMES = ("retccl", "sish", "yottixel")  # engine.evaluation.protocols.PROTOCOLS, without importing numpy here


def parse_ks(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        ks = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,3,5, not {value!r}") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter("k values must be integers >= 1")
    return ks


# --encoder may be given several times here, so this command declares the settings flags
# itself instead of using cli_common.settings_options (whose --encoder takes one value).
@click.command("benchmark")
@click.option(
    "--dataset",
    "dataset_spec",
    default=None,
    metavar="KIND:PATH",
    help=f"Data set, KIND one of {', '.join(KINDS)}; e.g. csv:patches/labels.csv, folder:NCT-CRC-HE-100K, unitopatho:unitopath-public/800, tissuenet:tissuenet/.",
)
@click.option(
    "--archive",
    "archive",
    is_flag=True,
    help="Instead of --dataset: slide-level benchmark of the indexed archive, every labelled slide a slide query against the rest (--label-column, default diagnosis; --exclude patient by default).",
)
@click.option(
    "--encoder",
    "encoders",
    multiple=True,
    metavar="SPEC",
    help="Encoder to compare (repeat for several: one table row, JSON entry and catalog run each, on the same patches and split): a RetCCL checkpoint (best_ckpt.pth), a `pretrain export` file, an encoder card (CARD.json, preset:NAME:WEIGHTS), or random[:ARCH] [default: HISTOSEEK_ENCODER, else <data-dir>/weights/best_ckpt.pth].",
)
@click.option(
    "--k",
    "ks",
    default=None,
    callback=parse_ks,
    metavar="K,K,...",
    help="Comma-separated k of Acc@k and MV@k; MV, mMV and mAP are shown at the largest [default: the protocol's, 1,3,5 for retccl and yottixel, 5,10 for sish].",
)
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOL_NAMES),
    default="retccl",
    show_default=True,
    help="Whose figures to report, under their names: retccl (Acc@k, mMV@k), sish (mMV@k, mAP@k normalised by k) or yottixel (macro-F1@k of the majority vote). See docs/benchmark.md.",
)
@click.option(
    "--exclude",
    "exclusion",
    type=click.Choice(EXCLUSIONS),
    default=None,
    help="Leave-one-out exclusion: a query never retrieves its own image, slide or patient [default: the strictest the data set records].",
)
@click.option(
    "--mpp",
    type=float,
    default=None,
    help="Microns per pixel to cut patches at (TissueNet, default the target mpp 1.0) or to rescale image patches of known mpp to before a centre crop [default for image sets: resize whole patches to 224 px].",
)
@click.option(
    "--label-column",
    default=None,
    help="Label column: csv (default `label`), unitopatho (top_label_name, type_name or grade_name) or, with --archive, a slide field (diagnosis (default), site, label, collection) or a key of the slides' extra metadata.",
)
@click.option(
    "--slide-column", default=None, help="csv: column naming each image's slide [default: `slide` if present]."
)
@click.option(
    "--patient-column", default=None, help="csv: column naming each image's patient [default: `patient` if present]."
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the full report (per-class and overall numbers, parameters, encoder sha256, counts) here.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a PNG: MV@k per class, Acc@k and MV@k curves.",
)
@click.option(
    "--svm",
    is_flag=True,
    help="Also report linear-SVM accuracy, cross-validated on the same features with folds that keep slides/patients whole.",
)
@click.option("--svm-folds", default=5, show_default=True, help="Folds of the SVM cross-validation.")
@click.option("--no-store", is_flag=True, help="Do not record the run in the catalog.")
@click.option("--batch-size", default=64, show_default=True, help="Patches per encoder batch.")
@click.option("--workers", type=int, default=None, help="Image decoding workers [default: cores - 1].")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the default catalog, weights and the feature cache (<data-dir>/cache) [env HISTOSEEK_DATA_DIR].",
)
@click.option(
    "--catalog",
    "catalog_url",
    default=None,
    metavar="URL",
    help="Catalog database URL where runs are recorded (and, with --archive, the archive's slides are read) [env HISTOSEEK_CATALOG].",
)
@click.option(
    "--index-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="--archive: folder of the FAISS shard files [env HISTOSEEK_INDEX_DIR].",
)
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [env HISTOSEEK_DEVICE].")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32"]),
    default=None,
    help="auto: fastest numerically safe path; fp32: exact [env HISTOSEEK_PRECISION].",
)
@handle_errors
def benchmark_command(
    dataset_spec,
    archive,
    encoders,
    ks,
    protocol,
    exclusion,
    mpp,
    label_column,
    slide_column,
    patient_column,
    json_path,
    plot_path,
    svm,
    svm_folds,
    no_store,
    batch_size,
    workers,
    data_dir,
    catalog_url,
    index_dir,
    device,
    precision,
) -> None:
    """Classification through search: leave-one-out Acc@k, MV@k, mMV@k and mAP@k.

    With --archive instead of --dataset, every labelled indexed slide is a slide query
    against the rest (its patient excluded) through the search engine: MV@k, mMV@k, mAP@k,
    macro-F1, per class, and the query time beside the published ones.

    Every patch of the data set is embedded once (cached per encoder and data set), then
    searched against all the others in one batched k-NN, dropping results from its own
    image/slide/patient. Prints a table like the RetCCL README, optionally writes JSON and
    a plot, and records the run in the catalog for the web app. Example:

    \b
        engine benchmark --dataset csv:patches/labels.csv --label-column label_nct9 \\
            --encoder random --json out.json --plot out.png
    """
    from engine.evaluation.benchmark import BenchmarkOptions, run_benchmark, store_runs
    from engine.evaluation.datasets import load_dataset
    from engine.evaluation.protocols import get_protocol
    from engine.evaluation.report import table, write_json, write_plot

    if mpp is not None and mpp <= 0:
        raise click.BadParameter("--mpp must be > 0")
    if bool(dataset_spec) == bool(archive):
        raise click.UsageError(
            "give either --dataset KIND:PATH (patch benchmark) or --archive (slide benchmark of the indexed archive)"
        )
    settings = Settings.load(
        data_dir=data_dir,
        catalog_url=catalog_url,
        index_dir=index_dir,
        encoder=encoders[0] if encoders else None,
        device=device,
        precision=precision,
    )
    if archive:
        if len(encoders) > 1:
            raise click.UsageError("--archive benchmarks the archive's own encoder: give at most one --encoder")
        return _archive_benchmark(
            settings,
            ks or get_protocol(protocol).default_ks,
            protocol,
            exclusion or "patient",
            label_column or "diagnosis",
            json_path,
            plot_path,
            no_store,
        )
    specs = list(encoders) or [settings.require_encoder()]
    dataset = load_dataset(
        dataset_spec,
        label_column=label_column,
        slide_column=slide_column,
        patient_column=patient_column,
        mpp=mpp,
        default_mpp=settings.target_mpp,
        tile_px=settings.tile_px,
    )
    counts = dataset.counts()
    click.echo(
        f"{dataset.kind}: {counts['items']} patches in {counts['classes']} classes"
        + (f" from {counts['slides']} slides" if counts["slides"] else ""),
        err=True,
    )
    ks = ks or get_protocol(protocol).default_ks
    opts = BenchmarkOptions(
        ks=ks,
        protocol=protocol,
        exclusion=exclusion,
        mpp=mpp,
        svm_folds=svm_folds if svm else 0,
        batch_size=batch_size,
        workers=workers,
    )
    report = run_benchmark(settings, dataset, specs, opts)
    plot = write_plot(report, Path(plot_path)) if plot_path else None
    # the JSON is written before the catalog is touched, so a catalog error loses nothing
    if json_path:
        write_json(report, Path(json_path))
    if not no_store:
        ids = store_runs(settings.catalog_url, report, plot.resolve() if plot else None)
        click.echo(f"recorded as benchmark run(s) {', '.join(map(str, ids))} in the catalog", err=True)
        if json_path:
            write_json(report, Path(json_path))  # now with the catalog run ids
    if json_path:
        click.echo(f"wrote {json_path}", err=True)
    if plot:
        click.echo(f"wrote {plot}", err=True)
    click.echo(table(report))


def _archive_benchmark(settings, ks, protocol, exclusion, label_column, json_path, plot_path, no_store) -> None:
    from engine.evaluation.benchmark import store_runs
    from engine.evaluation.report import write_json, write_plot
    from engine.evaluation.slide_benchmark import SlideBenchmarkOptions, run_slide_benchmark, slide_table

    if exclusion == "image":
        exclusion = "slide"  # a slide query's "image" is its slide
    # no --encoder: the index's own (engine.search.which_encoder), as every search does
    opts = SlideBenchmarkOptions(ks=tuple(ks), label_column=label_column, exclusion=exclusion, protocol=protocol)
    report = run_slide_benchmark(
        settings,
        opts,
        progress=lambda done, n: (
            click.echo(f"  {done}/{n} slide queries", err=True) if done == n or done % 50 == 0 else None
        ),
    )
    plot = write_plot(report, Path(plot_path)) if plot_path else None
    if json_path:
        write_json(report, Path(json_path))
    if not no_store:
        ids = store_runs(settings.catalog_url, report, plot.resolve() if plot else None)
        click.echo(f"recorded as benchmark run {ids[0]} in the catalog", err=True)
        if json_path:
            write_json(report, Path(json_path))
    click.echo(slide_table(report))
