"""Benchmark run metrics for the pages: the overall table, per-class table, and a plot
(Acc@k / MV@k against k, per-class MV@k bars) drawn server-side as PNG (matplotlib, Agg)
so the page needs no plotting library in the browser.

Runs stored by `engine benchmark` (patch sets, and `--archive` slide runs) hold
{"overall": {"acc@1": ..}, "per_class": {class: {"count", "acc@1", ..}}, "curve": {"k": [..],
"acc": [..], "mv": [..]}, "svm": {..}, "protocol": {"name", "figures": {..}}}; slide runs add
"query_time" {"p50_s", "p95_s", "published_s"} and "protocols" (every peer's figures).
"""

from __future__ import annotations

import io
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

METRIC_AT_K = re.compile(r"^(?P<name>[A-Za-z_]+)@(?P<k>\d+)$")


def _numbers(doc) -> dict[str, float]:
    if not isinstance(doc, dict):
        return {}
    return {str(k): float(v) for k, v in doc.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def overall(metrics: dict) -> dict[str, float]:
    """The headline numbers of a run (acc@k, mv@k, mmv@k, map@k, ...)."""
    return _numbers(metrics.get("overall"))


def per_class(metrics: dict) -> dict[str, dict[str, float]]:
    doc = metrics.get("per_class")
    return {str(name): _numbers(values) for name, values in doc.items()} if isinstance(doc, dict) else {}


def svm(metrics: dict) -> dict[str, float]:
    return _numbers(metrics.get("svm"))


def protocol(metrics: dict) -> tuple[str | None, dict[str, float]]:
    """(protocol name, its figures under their own names) of a run; (None, {}) when it has none."""
    doc = metrics.get("protocol")
    if not isinstance(doc, dict):
        return None, {}
    return (str(doc["name"]) if doc.get("name") else None), _numbers(doc.get("figures"))


def query_time(metrics: dict) -> dict[str, float]:
    """p50_s, p95_s, mean_s of a slide run's queries ({} for patch runs)."""
    return _numbers(metrics.get("query_time"))


def curves(metrics: dict) -> dict[str, list[tuple[int, float]]]:
    """Metrics against k: the stored curve when there is one, else the overall metric@k values."""
    curve = metrics.get("curve")
    if isinstance(curve, dict) and isinstance(curve.get("k"), list):
        out = {}
        for key, label in (("acc", "Acc@k"), ("mv", "MV@k")):
            if isinstance(curve.get(key), list) and len(curve[key]) == len(curve["k"]):
                out[label] = list(zip(curve["k"], curve[key]))
        if out:
            return out
    found: dict[str, list[tuple[int, float]]] = {}
    for key, value in overall(metrics).items():
        match = METRIC_AT_K.match(key)
        if match:
            found.setdefault(f"{match['name']}@k", []).append((int(match["k"]), value))
    return {name: sorted(points) for name, points in found.items()}


def percent(value: float) -> float:
    """Fractions are shown as percentages, like the RetCCL tables."""
    return value * 100 if abs(value) <= 1.0 else value


def metrics_plot_png(title: str, metrics: dict) -> bytes | None:
    """Curves against k, plus per-class MV@k bars when the run has them; None when there is
    nothing to plot."""
    lines = curves(metrics)
    classes = per_class(metrics)
    mv_keys = sorted((k for k in next(iter(classes.values()), {}) if k.startswith("mv@")), key=lambda k: int(k[3:]))
    if not lines:
        return None
    panels = 2 if classes and mv_keys else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 3.6), dpi=100, squeeze=False)
    ax = axes[0][0]
    for name, points in sorted(lines.items()):
        ax.plot([k for k, _ in points], [percent(v) for _, v in points], marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("k (results considered)")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    if panels == 2:
        key = mv_keys[-1]
        names = sorted(classes)
        bars = axes[0][1]
        bars.bar(range(len(names)), [percent(classes[n].get(key, 0.0)) for n in names], color="#7a1f5c")
        bars.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
        bars.set_ylabel("%")
        bars.set_title(f"per-class {key.upper()}")
        bars.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def roc_plot_png(title: str, metrics: dict) -> bytes | None:
    """The ROC curves of a MIL run (per fold and pooled, or one-vs-rest per class), drawn
    from the points stored in the run; None when it has none."""
    from engine.mil.report import draw_roc

    if not any(c.get("fpr") for c in metrics.get("roc", []) if isinstance(c, dict)):
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=100)
    draw_roc(ax, metrics, title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
