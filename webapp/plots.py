"""Benchmark run metrics for the pages: the overall table, per-class table, and a plot
(Acc@k / MV@k against k, per-class MV@k bars) drawn server-side as PNG (matplotlib, Agg)
so the page needs no plotting library in the browser.

Runs stored by `engine benchmark` (patch sets, and `--archive` slide runs) hold
{"overall": {"acc@1": ..}, "per_class": {class: {"count", "acc@1", ..}}, "curve": {"k": [..],
"acc": [..], "mv": [..]}, "svm": {..}, "protocol": {"name", "figures": {..}}}; slide runs add
"query_time" {"p50_s", "p95_s", "published_s"} and "protocols" (every peer's figures).

Side by side: `comparisons` groups runs of different encoders on the same data set and
protocol (same label column, k, exclusion and mpp) and draws each group as grouped bars, an
inline SVG, one bar per encoder for each figure.
"""

from __future__ import annotations

import io
import re

import matplotlib
from markupsafe import Markup, escape

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


# what must agree for two runs to be compared: the same patches, split and figures
COMPARED_PARAMETERS = ("protocol", "label_column", "k", "exclusion", "mpp", "level")
PALETTE = ("#7a1f5c", "#1f5c7a", "#5c7a1f", "#c07a1f", "#5c5c5c", "#1f7a5c", "#a03030", "#30307a")


def _order(name: str):
    base, _, k = name.partition("@")
    return (base, int(k) if k.isdigit() else 0, name)


def comparisons(runs: list[dict]) -> list[dict]:
    """Groups of runs (benchmark_json dicts, newest first) of at least two encoders on the same
    data set and protocol; per encoder the newest run. Each group: title, dataset_kind,
    dataset_path, protocol, metrics (the overall figures every run has), rows (run id, encoder,
    sha256, when, values) and svg (grouped bars)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        params = run.get("parameters") if isinstance(run.get("parameters"), dict) else {}
        key = repr((run.get("dataset_kind"), run.get("dataset_path"), [params.get(p) for p in COMPARED_PARAMETERS]))
        groups.setdefault(key, []).append(run)
    out = []
    for members in groups.values():
        newest: dict[tuple, dict] = {}
        for run in members:
            newest.setdefault((run.get("encoder_name"), run.get("encoder_sha256")), run)
        if len(newest) < 2:
            continue
        chosen = list(newest.values())[::-1]  # oldest first: the order they were run in
        values = [overall(run.get("metrics") or {}) for run in chosen]
        metrics = sorted(set.intersection(*(set(v) for v in values)), key=_order)
        if not metrics:
            continue
        first = chosen[0]
        params = first.get("parameters") or {}
        rows = [
            {
                "id": run.get("id"),
                "encoder_name": str(run.get("encoder_name")),
                "encoder_sha256": run.get("encoder_sha256"),
                "created_at": run.get("created_at"),
                "values": {m: v[m] for m in metrics},
            }
            for run, v in zip(chosen, values)
        ]
        title = f"{first.get('dataset_kind')} · {params.get('label_column') or 'label'} · {params.get('protocol') or 'retccl'}"
        out.append(
            {
                "title": title,
                "dataset_kind": first.get("dataset_kind"),
                "dataset_path": first.get("dataset_path"),
                "protocol": params.get("protocol"),
                "metrics": metrics,
                "rows": rows,
                "svg": grouped_bars_svg(metrics, [(r["encoder_name"], r["values"]) for r in rows]),
            }
        )
    return out


def grouped_bars_svg(metrics: list[str], series: list[tuple[str, dict[str, float]]]) -> Markup:
    """An inline SVG: for each metric a group of bars, one per (name, values) series, in %."""
    bar, gap, left, top, plot_h = 14, 22, 40, 10, 180
    group_w = bar * len(series) + gap
    width = max(360, left + group_w * len(metrics) + 10)
    legend_y = top + plot_h + 34
    height = legend_y + 16 * len(series) + 6
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="comparison-plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="benchmark runs side by side">'
    ]
    for pct in (0, 25, 50, 75, 100):
        y = top + plot_h * (1 - pct / 100)
        parts.append(f'<line x1="{left}" x2="{width - 5}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{pct}</text>')
    for g, metric in enumerate(metrics):
        x0 = left + g * group_w + gap / 2
        for i, (name, values) in enumerate(series):
            v = max(0.0, min(100.0, percent(values.get(metric, 0.0))))
            h = plot_h * v / 100
            parts.append(
                f'<rect x="{x0 + i * bar:.1f}" y="{top + plot_h - h:.1f}" width="{bar - 2}" height="{h:.1f}" '
                f'fill="{PALETTE[i % len(PALETTE)]}"><title>{escape(name)} {escape(metric)}: {v:.2f} %</title></rect>'
            )
        label_x = x0 + bar * len(series) / 2
        parts.append(
            f'<text x="{label_x:.1f}" y="{top + plot_h + 14}" font-size="10" text-anchor="middle">{escape(metric)}</text>'
        )
    for i, (name, _) in enumerate(series):
        y = legend_y + 16 * i
        parts.append(f'<rect x="{left}" y="{y - 9}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>')
        parts.append(f'<text x="{left + 14}" y="{y}" font-size="11">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
