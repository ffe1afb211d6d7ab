"""Plots for the benchmark pages: retrieval metrics against k, drawn server-side as PNG
(matplotlib, Agg) so the page needs no plotting library in the browser."""

from __future__ import annotations

import io
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

# "acc@5", "Acc@5", "mMV@5", "map@10", nested {"acc": {"5": ...}} flattened to "acc.5".
METRIC_AT_K = re.compile(r"^(?P<name>[A-Za-z_]+)(?:@|\.|_at_)(?P<k>\d+)$")


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics document as {'a.b.c': value}."""
    flat = {}
    for key, value in (metrics or {}).items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def metric_curves(metrics: dict) -> dict[str, list[tuple[int, float]]]:
    """Top-level metrics that vary with k, as {name: [(k, value), ...]} sorted by k."""
    curves = defaultdict(list)
    for key, value in flatten(metrics).items():
        match = METRIC_AT_K.match(key)
        if match:
            curves[match["name"]].append((int(match["k"]), value))
    return {name: sorted(points) for name, points in curves.items()}


def as_percent(values: list[float]) -> tuple[list[float], str]:
    """Metrics stored as fractions are shown as percentages, like the RetCCL tables."""
    if values and max(values) <= 1.0:
        return [v * 100 for v in values], "%"
    return values, ""


def metrics_plot_png(title: str, metrics: dict) -> bytes | None:
    """A line plot of each metric against k, or None when the run has no metric@k."""
    curves = metric_curves(metrics)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    unit = ""
    for name, points in sorted(curves.items()):
        ks = [k for k, _ in points]
        values, unit = as_percent([v for _, v in points])
        ax.plot(ks, values, marker="o", label=name)
    ax.set_xlabel("k (results considered)")
    ax.set_ylabel(f"score {unit}".strip())
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
