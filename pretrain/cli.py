"""`python -m pretrain`: train (one process or torchrun), export, lincls, plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from click.core import ParameterSource

from engine.cli.common import handle_errors, settings_options, setup_logging
from engine.config import Settings
from engine.encoder import ARCH_DIMS
from engine.files import atomic_write_text


def _rank() -> int | None:
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More logging.")
def main(verbose: int) -> None:
    """CCL pretraining of the histoseek encoder (clustering-guided contrastive learning).

    \b
    One process:   python -m pretrain train --data TILES/ --out runs/ccl
    One node:      torchrun --nproc-per-node 4 -m pretrain train --data TILES/ --out runs/ccl
    Several nodes: torchrun --nnodes 2 --node-rank R --rdzv-backend c10d \\
                     --rdzv-endpoint HOST:29500 --nproc-per-node 8 -m pretrain train ...
    Then:          python -m pretrain export runs/ccl --out ccl.pth
                   engine features tiles/ --encoder ccl.pth --out feats.npy
    """
    setup_logging(verbose, rank=_rank())


@main.command()
@click.option(
    "--data",
    required=True,
    help="Folder of tile images, a .txt list of image paths, or a catalog URL (sqlite:///catalog.sqlite) whose indexed tiles are read from the slides on the fly.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder: checkpoint.pt, metrics.jsonl, loss.png, run.json.",
)
@click.option(
    "--arch",
    type=click.Choice(sorted(ARCH_DIMS)),
    default="resnet50",
    show_default=True,
    help="Backbone (smaller ResNets for experiments).",
)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Tiles per rank per micro-batch.")
@click.option(
    "--accum-steps", type=int, default=1, show_default=True, help="Micro-batches accumulated per optimiser step."
)
@click.option(
    "--epochs", type=int, default=100, show_default=True, help="Passes over the tiles (ignored with --max-steps)."
)
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimiser steps.")
@click.option(
    "--lr",
    type=float,
    default=0.03,
    show_default=True,
    help="Learning rate per 256 images of global batch (cosine schedule).",
)
@click.option("--warmup-steps", type=int, default=0, show_default=True, help="Linear learning-rate warm-up steps.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option(
    "--queue-size",
    type=int,
    default=65536,
    show_default=True,
    help="Negative keys in the queue (at least one global batch).",
)
@click.option("--temperature", type=float, default=0.07, show_default=True, help="Instance-level InfoNCE temperature.")
@click.option("--key-momentum", type=float, default=0.999, show_default=True, help="Momentum of the key encoder.")
@click.option(
    "--num-clusters",
    type=int,
    default=32,
    show_default=True,
    help="k-means clusters over each global batch (capped at half of it).",
)
@click.option("--kmeans-iters", type=int, default=10, show_default=True, help="k-means iterations per step.")
@click.option("--proj-dim", type=int, default=128, show_default=True, help="Width of the normalised projections.")
@click.option(
    "--group-weight", type=float, default=0.25, show_default=True, help="Weight of the group-level (cluster) loss."
)
@click.option("--group-temperature", type=float, default=0.2, show_default=True)
@click.option(
    "--same-cluster-weight",
    type=float,
    default=0.5,
    show_default=True,
    help="Weight of queue negatives in the query's own cluster (1 = plain MoCo).",
)
@click.option("--crop-px", type=int, default=224, show_default=True, help="Edge of the augmented views in pixels.")
@click.option(
    "--min-crop-scale",
    type=float,
    default=0.2,
    show_default=True,
    help="Smallest area fraction of a tile a view may crop.",
)
@click.option(
    "--jitter",
    type=float,
    default=1.0,
    show_default=True,
    help="Strength of colour and HED stain jitter (0: off; below 1 for continued pretraining).",
)
@click.option(
    "--tile-px",
    type=int,
    default=224,
    show_default=True,
    help="Pixels a catalog tile is read out at before augmentation.",
)
@click.option(
    "--slide-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder that relative slide paths in the catalog start from [default: current folder].",
)
@click.option(
    "--shuffle-block",
    type=int,
    default=16384,
    show_default=True,
    help="Tiles shuffled together (memory holds one block).",
)
@click.option("--workers", type=int, default=4, show_default=True, help="Data loader processes per rank.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--device", default="auto", show_default=True, help="auto (GPU of the local rank if CUDA is present), cpu or cuda."
)
@click.option(
    "--amp/--no-amp", default=None, help="fp16 autocast + gradient scaling [default: on for CUDA, off on CPU]."
)
@click.option("--sync-bn", is_flag=True, help="SyncBatchNorm across ranks (CUDA only) instead of MoCo's shuffle-BN.")
@click.option(
    "--checkpoint-every", type=int, default=500, show_default=True, help="Optimiser steps between checkpoints."
)
@click.option("--log-every", type=int, default=10, show_default=True, help="Optimiser steps between metric lines.")
@click.option(
    "--resume", is_flag=True, help="Continue the run in --out from its last checkpoint, exactly where it stopped."
)
@handle_errors
def train(resume: bool, **options) -> None:
    """Pretrain the encoder with CCL on tiles; resumable, one process or many (torchrun).

    Each rank reads its share of the tile stream; checkpoints go to --out every
    --checkpoint-every steps. A killed run continues with the same command plus --resume.
    """
    from pretrain.config import TrainConfig
    from pretrain.train import train as run_training

    ctx = click.get_current_context()
    explicit = {
        name
        for name in options
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    summary = run_training(TrainConfig(**options), resume=resume, explicit=explicit)
    if _rank() in (None, 0):
        click.echo(json.dumps(summary))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Backbone file to write (use it as --encoder)."
)
@handle_errors
def export(run_dir: str, out: str) -> None:
    """Write the trained backbone of RUN_DIR as an encoder checkpoint.

    The file holds plain torchvision ResNet keys without fc (the released RetCCL layout)
    and the architecture name; pass it as --encoder to `engine features`, `indexer build`,
    the web app and benchmarks.
    """
    from pretrain.checkpoint import export_backbone

    click.echo(json.dumps(export_backbone(Path(run_dir), Path(out))))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def plot(run_dir: str) -> None:
    """(Re)draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl."""
    from pretrain.plots import plot_loss_curve

    out = plot_loss_curve(Path(run_dir) / "metrics.jsonl", Path(run_dir) / "loss.png")
    if out is None:
        raise click.ClickException(f"{run_dir} has no logged steps yet (metrics.jsonl is missing or empty)")
    click.echo(str(out))


@main.command()
@click.option(
    "--dataset",
    "dataset_spec",
    required=True,
    metavar="KIND:PATH",
    help="Labelled patches, as the benchmark reads them: folder:DIR, csv:FILE.csv, unitopatho:DIR, tissuenet:DIR.",
)
@click.option("--label-column", default=None, help="Label column (csv, unitopatho).")
@click.option(
    "--mode",
    type=click.Choice(["linear", "finetune"]),
    default="linear",
    show_default=True,
    help="linear: frozen backbone + linear layer; finetune: train backbone and layer together.",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.05, 0.95),
    default=0.3,
    show_default=True,
    help="Share of patches (whole slides/patients) held out for validation.",
)
@click.option(
    "--exclude",
    "exclusion",
    type=click.Choice(["image", "slide", "patient"]),
    default=None,
    help="Keep each slide/patient on one side of the split [default: the strictest the data set knows].",
)
@click.option("--epochs", type=int, default=None, help="Training epochs [default: 300 linear, 10 finetune].")
@click.option("--lr", type=float, default=None, help="Learning rate [default: 0.01].")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--tile-px",
    type=int,
    default=None,
    help="Patch edge in pixels fed to the encoder [env HISTOSEEK_TILE_PX; default 224].",
)
@click.option(
    "--mpp", type=float, default=None, help="Rescale patches of known resolution to this many microns per pixel."
)
@click.option("--workers", type=int, default=None, help="Decoding worker processes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and the training.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON here.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the confusion matrix as PNG here.")
@settings_options
@handle_errors
def lincls(
    dataset_spec,
    label_column,
    mode,
    val_fraction,
    exclusion,
    epochs,
    lr,
    batch_size,
    mpp,
    workers,
    seed,
    out,
    plot,
    settings: Settings,
) -> None:
    """Linear probe or fine-tuning of --encoder on a labelled patch set; accuracy per class.

    Example, the encoder of a pretraining run on Kather-style folders:

        python -m pretrain lincls --dataset folder:NCT-CRC-HE-100K --encoder ccl.pth
    """
    from engine.encoder import Encoder
    from engine.evaluation.datasets import load_dataset
    from pretrain.lincls import ProbeOptions, format_report, plot_confusion, run_probe

    tile_px = settings.tile_px  # --tile-px lands in the settings, as for every engine command
    dataset = load_dataset(dataset_spec, label_column=label_column, tile_px=tile_px, mpp=mpp)
    encoder = Encoder.from_spec(
        settings.require_encoder(), device=settings.device, precision=settings.precision if mode == "linear" else "fp32"
    )
    click.echo(f"encoder: {encoder.info.describe()} on {encoder.device}", err=True)
    opts = ProbeOptions(
        mode=mode,
        val_fraction=val_fraction,
        exclusion=exclusion,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        tile_px=tile_px,
        mpp=mpp,
        workers=workers,
        seed=seed,
    )
    report = run_probe(encoder, dataset, opts)
    click.echo(format_report(report))
    if out:
        atomic_write_text(out, json.dumps(report, indent=1))
    if plot:
        plot_confusion(report, plot)
