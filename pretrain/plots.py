"""Plots of a pretraining run: the loss curve from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend chosen first: no display on servers)

from engine.files import atomic_output  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out: Path) -> Path | None:
    """Total, instance and group loss (left) and learning rate (right) against the step.
    Returns the PNG path, or None when nothing has been logged yet."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    for key, style in (("loss", "-"), ("loss_instance", "--"), ("loss_group", ":")):
        ax.plot(steps, [r[key] for r in rows], style, label=key.replace("_", " "))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title("CCL pretraining loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in rows])
    ax_lr.set_xlabel("optimiser step")
    ax_lr.set_title("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
