"""Linear probe and fine-tuning of an encoder on a labelled patch set, with accuracy per class.

The data set is any kind the benchmark reads (`engine.evaluation.datasets.load_dataset`: folder, csv,
unitopatho, tissuenet). It is split once into train and validation parts, stratified by
class and keeping each slide/patient (the strictest the data set knows) on one side, so the
score is not inflated by near-duplicate patches of one slide.

- linear:   frozen backbone; features computed once (as `engine features` does),
            standardised with the train part's statistics, then a linear layer trained by
            full-batch Adam. Measures the features themselves.
- finetune: backbone + linear layer trained end to end with SGD on flipped/rotated patches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.encoder import Encoder
from engine.errors import DatasetError
from engine.evaluation.benchmark import embed_items
from engine.evaluation.datasets import LabelledSet
from engine.evaluation.datasets.reading import ItemImages
from engine.evaluation.metrics import encode_labels
from engine.features import collate_rows
from engine.files import atomic_output

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    """mode: linear or finetune; epochs/lr default by mode (linear 300 / 1e-2 Adam,
    finetune 10 / 1e-2 SGD); val_fraction of the groups held out; exclusion: the grouping
    kept whole across the split (None: the strictest the data set knows)."""

    mode: str = "linear"
    val_fraction: float = 0.3
    exclusion: str | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 64
    tile_px: int = 224
    mpp: float | None = None
    workers: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("linear", "finetune"):
            raise ValueError(f"mode must be linear or finetune, not {self.mode!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be between 0 and 1")


def split_train_val(
    dataset: LabelledSet, val_fraction: float, exclusion: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and validation parts: stratified by label, groups whole."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.array(dataset.labels)
    groups = dataset.groups(exclusion)
    folds = max(2, round(1 / val_fraction))
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise DatasetError(
            f"a {val_fraction:.0%} validation split by {exclusion} needs at least {folds} {exclusion} groups; this data set has {n_groups} (split by image instead, or use a larger validation fraction)"
        )
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_idx, val_idx = next(cv.split(np.zeros(len(labels)), labels, groups))
    missing = sorted(set(labels) - set(labels[train_idx]))
    if missing:
        raise DatasetError(
            f"classes {missing} have no training patch after the {exclusion}-level split; add patches or split by image instead"
        )
    return train_idx, val_idx


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean of per-class recall), accuracy per class, confusion."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    per_class = {}
    for c, name in enumerate(classes):
        n = int(confusion[c].sum())
        if n:
            per_class[name] = {"n": n, "correct": int(confusion[c, c]), "accuracy": float(confusion[c, c] / n)}
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "balanced_accuracy": float(np.mean([v["accuracy"] for v in per_class.values()])) if per_class else float("nan"),
        "per_class": per_class,
        "classes": list(classes),
        "confusion": confusion.tolist(),
    }


def train_linear(
    x_train: np.ndarray, y_train: np.ndarray, n_classes: int, epochs: int, lr: float, seed: int
) -> tuple[nn.Linear, np.ndarray, np.ndarray]:
    """A linear classifier on standardised features (full-batch Adam, light weight decay).
    Returns the layer and the train mean and std used to standardise."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x = torch.from_numpy((x_train - mean) / std).float()  # N x D
    y = torch.from_numpy(y_train).long()  # N
    torch.manual_seed(seed)
    layer = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(layer(x), y).backward()
        opt.step()
    return layer, mean, std


def linear_probe(
    encoder: Encoder,
    dataset: LabelledSet,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    codes: np.ndarray,
    n_classes: int,
    opts: ProbeOptions,
    progress: bool,
) -> np.ndarray:
    feats = embed_items(
        encoder,
        dataset,
        tile_px=opts.tile_px,
        mpp=opts.mpp,
        batch_size=opts.batch_size,
        workers=opts.workers,
        progress=progress,
    )
    layer, mean, std = train_linear(
        feats[train_idx], codes[train_idx], n_classes, opts.epochs or 300, opts.lr or 1e-2, opts.seed
    )
    with torch.no_grad():
        return layer(torch.from_numpy((feats[val_idx] - mean) / std).float()).argmax(1).numpy()


def _flip_rotate(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same random flip and 90-degree rotation for a whole uint8 batch (tissue has no up)."""
    if torch.rand((), generator=gen) < 0.5:
        batch = batch.flip(-1)
    return torch.rot90(batch, int(torch.randint(0, 4, (), generator=gen)), dims=(-2, -1))


def fine_tune(
    encoder: Encoder,
    dataset: LabelledSet,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    codes: np.ndarray,
    n_classes: int,
    opts: ProbeOptions,
    progress: bool,
) -> np.ndarray:
    """Backbone + linear head trained end to end (SGD, cosine lr); predictions on val."""
    torch.manual_seed(opts.seed)
    device = encoder.device
    model = nn.Sequential(encoder.model, nn.Linear(encoder.dim, n_classes)).to(device)
    epochs, lr = opts.epochs or 10, opts.lr or 1e-2
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    items = dataset.items
    train_items = [items[i] for i in train_idx]
    targets = torch.from_numpy(codes[train_idx]).long()
    workers = 0 if opts.workers is None else opts.workers
    gen = torch.Generator().manual_seed(opts.seed)
    steps = epochs * math.ceil(len(train_items) / opts.batch_size)
    step = 0
    with tqdm(total=steps, unit="step", desc="fine-tune", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(train_items), generator=gen).tolist()
            loader = DataLoader(
                ItemImages([train_items[i] for i in order], opts.tile_px, opts.mpp),
                batch_size=opts.batch_size,
                num_workers=workers,
                collate_fn=collate_rows,
            )
            model.train()
            for rows, batch, errors in loader:
                if errors:
                    raise DatasetError(f"item {train_items[order[errors[0][0]]].key}: {errors[0][1]}")
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                logits = model(encoder.normalise(_flip_rotate(batch, gen)))  # B x C
                loss = F.cross_entropy(logits, targets[[order[r] for r in rows]].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.detach().item():.3f}")
    model.eval()
    val = dataset.items
    preds = []
    loader = DataLoader(
        ItemImages([val[i] for i in val_idx], opts.tile_px, opts.mpp),
        batch_size=opts.batch_size,
        num_workers=workers,
        collate_fn=collate_rows,
    )
    with torch.no_grad():
        for _rows, batch, errors in loader:
            if errors:
                raise DatasetError(f"item {val[val_idx[errors[0][0]]].key}: {errors[0][1]}")
            preds.append(model(encoder.normalise(batch)).argmax(1).cpu())
    return torch.cat(preds).numpy()


def run_probe(encoder: Encoder, dataset: LabelledSet, opts: ProbeOptions, progress: bool = True) -> dict[str, Any]:
    """Split, train (linear or fine-tune), predict the validation part; the report."""
    exclusion = opts.exclusion or dataset.strictest_exclusion()
    codes, classes = encode_labels(dataset.labels)
    train_idx, val_idx = split_train_val(dataset, opts.val_fraction, exclusion, opts.seed)
    probe = linear_probe if opts.mode == "linear" else fine_tune
    preds = probe(encoder, dataset, train_idx, val_idx, codes, len(classes), opts, progress)
    report = classification_report(codes[val_idx], preds, classes)
    report.update(
        mode=opts.mode,
        encoder={
            "name": encoder.info.name,
            "architecture": encoder.info.architecture,
            "checkpoint_sha256": encoder.info.checkpoint_sha256,
            "random": encoder.info.is_random,
        },
        dataset={"kind": dataset.kind, "root": str(dataset.root), "label_column": dataset.label_column},
        split={
            "exclusion": exclusion,
            "train": int(len(train_idx)),
            "val": int(len(val_idx)),
            "val_fraction": opts.val_fraction,
            "seed": opts.seed,
        },
        epochs=opts.epochs or (300 if opts.mode == "linear" else 10),
        lr=opts.lr or 1e-2,
    )
    return report


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: accuracy per class, then the totals."""
    width = max([len(c) for c in report["per_class"]] + [len("balanced accuracy")])
    lines = [
        f"{report['mode']} probe of {report['encoder']['name']} on {report['dataset']['kind']} ({report['split']['train']} train / {report['split']['val']} val patches, split by {report['split']['exclusion']})",
        f"{'class':<{width}}  {'n':>5}  accuracy",
    ]
    for name, row in report["per_class"].items():
        lines.append(f"{name:<{width}}  {row['n']:>5}  {row['accuracy']:8.3f}")
    lines.append(f"{'accuracy':<{width}}  {report['n']:>5}  {report['accuracy']:8.3f}")
    lines.append(f"{'balanced accuracy':<{width}}  {'':>5}  {report['balanced_accuracy']:8.3f}")
    return "\n".join(lines)


def plot_confusion(report: dict[str, Any], out) -> None:
    """Row-normalised confusion matrix of the validation part as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(report["confusion"], float)
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    classes = report["classes"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(classes), 1.0 + 0.5 * len(classes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if conf[i, j]:
                ax.text(j, i, int(conf[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{report['mode']} probe: accuracy {report['accuracy']:.3f}")
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
