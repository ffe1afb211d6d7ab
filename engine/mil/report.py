"""Scoring a MIL run: per fold and mean +- sd AUC (one-vs-rest macro for more than two
classes), balanced accuracy, confusion matrix; the ROC plot (PNG) and the catalog run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from engine.files import atomic_output


def auc(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float | None:
    """ROC AUC; None when the set lacks a class (undefined, and said so in the report)."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < n_classes:
        return None
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(n_classes))))


def scores(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict:
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    pred = probs.argmax(1)
    return {
        "auc": auc(y, probs, n_classes),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "accuracy": float((pred == y).mean()),
        "confusion": confusion_matrix(y, pred, labels=list(range(n_classes))).tolist(),
        "slides": int(len(y)),
    }


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def roc_points(y: np.ndarray, score: np.ndarray, max_points: int = 101) -> dict | None:
    """An ROC curve thinned to at most `max_points` points (stored in the catalog run)."""
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, score)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).round().astype(int))
    return {"fpr": [round(float(v), 4) for v in fpr[keep]], "tpr": [round(float(v), 4) for v in tpr[keep]]}


def summarise(folds: list[dict], classes: tuple[str, ...]) -> dict:
    """The metrics document of a run from its folds' out-of-fold predictions."""
    n = len(classes)
    per_fold, ys, ps, curves = [], [], [], []
    for f in folds:
        y, p = np.array(f["y"], np.int64), np.array(f["probs"], np.float64)
        ys.append(y)
        ps.append(p)
        per_fold.append(
            {
                "fold": f["fold"],
                **scores(y, p, n),
                "epochs": f["train"]["epochs"],
                "best_epoch": f["train"]["best_epoch"],
            }
        )
        if n == 2:
            curves.append({"name": f"fold {f['fold']}", **(roc_points(y, p[:, 1]) or {"fpr": [], "tpr": []})})
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)
    pooled = scores(y_all, p_all, n)
    if n == 2:
        curves.append({"name": "all folds", **(roc_points(y_all, p_all[:, 1]) or {"fpr": [], "tpr": []})})
    else:  # one-vs-rest per class over the pooled out-of-fold predictions
        curves += [
            {"name": f"{c} vs rest", **(roc_points((y_all == i).astype(int), p_all[:, i]) or {"fpr": [], "tpr": []})}
            for i, c in enumerate(classes)
        ]
    auc_mean, auc_sd = _mean_sd([f["auc"] for f in per_fold])
    bacc_mean, bacc_sd = _mean_sd([f["balanced_accuracy"] for f in per_fold])
    overall = {
        "auc": auc_mean,
        "auc_sd": auc_sd,
        "balanced_accuracy": bacc_mean,
        "balanced_accuracy_sd": bacc_sd,
        "pooled_auc": pooled["auc"],
    }
    return {
        "overall": {k: v for k, v in overall.items() if v is not None},
        "folds": per_fold,
        "pooled": pooled,
        "classes": list(classes),
        "auc_kind": "binary" if n == 2 else "one-vs-rest macro",
        "roc": curves,
        "folds_without_auc": [f["fold"] for f in per_fold if f["auc"] is None],
    }


def fmt(mean: float | None, sd: float | None) -> str:
    return "n/a" if mean is None or (isinstance(mean, float) and math.isnan(mean)) else f"{mean:.3f} ± {sd or 0:.3f}"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def text_summary(metrics: dict) -> str:
    o = metrics["overall"]
    lines = ["| fold | slides | AUC | balanced acc | epochs (best) |", "|---|---|---|---|---|"]
    for f in metrics["folds"]:
        lines.append(
            f"| {f['fold']} | {f['slides']} | {_num(f['auc'])} | {f['balanced_accuracy']:.3f} | {f['epochs']} ({f['best_epoch']}) |"
        )
    lines.append(
        f"| mean ± sd | {sum(f['slides'] for f in metrics['folds'])} | {fmt(o.get('auc'), o.get('auc_sd'))} | {fmt(o.get('balanced_accuracy'), o.get('balanced_accuracy_sd'))} | |"
    )
    lines.append("")
    lines.append(
        f"AUC: {metrics['auc_kind']}; confusion matrix over all folds (rows true, columns predicted; {', '.join(metrics['classes'])}):"
    )
    lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in metrics["pooled"]["confusion"]]
    return "\n".join(lines)


def draw_roc(ax, metrics: dict, title: str) -> None:
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    for c in metrics.get("roc", []):
        if c.get("fpr"):
            ax.plot(c["fpr"], c["tpr"], label=c["name"], linewidth=2.2 if c["name"] == "all folds" else 1.2)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize="medium")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize="x-small")


def write_roc_png(metrics: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.6), dpi=100)
    draw_roc(ax, metrics, title)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return Path(path)


def store_run(
    catalog_url: str, run_dir: Path, contract: dict, parameters: dict, metrics: dict, plot: Path | None
) -> int:
    """Record (or update: a rerun of a finished run folder is the same run) the catalog run."""
    import sqlalchemy as sa

    from engine.catalog.db import Catalog
    from engine.catalog.models import BenchmarkRun

    catalog = Catalog(catalog_url)
    try:
        with catalog.session() as s:
            row = s.scalar(
                sa.select(BenchmarkRun).where(
                    BenchmarkRun.dataset_kind == "mil", BenchmarkRun.dataset_path == str(run_dir)
                )
            )
            if row is None:
                row = BenchmarkRun(dataset_kind="mil", dataset_path=str(run_dir))
                s.add(row)
            row.encoder_name, row.encoder_sha256 = contract["encoder_name"], contract["encoder_sha256"]
            row.parameters = {**parameters, "contract": contract}
            row.metrics = metrics
            row.plot_path = str(plot) if plot else None
            s.flush()
            return row.id
    finally:
        catalog.dispose()
