"""Presenting a benchmark report: the RetCCL-README-shaped table, the JSON file and the plot
(per-class MV@k bars, Acc@k / MV@k curves)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.evaluation.benchmark import BenchmarkReport
from engine.evaluation.protocols import exclusion_note, get_protocol
from engine.files import atomic_output, atomic_write_text


def _figure_head(name: str) -> str:
    return name.replace("acc@", "Acc@").replace("macro_f1@", "macro-F1@")


def table(report: BenchmarkReport) -> str:
    """A markdown table, one row per encoder, percentages. The retccl protocol (default) is
    shaped like the RetCCL README: Acc@k for each k, then MV, mMV and mAP at the largest k;
    sish and yottixel show their own figures (mMV@k and mAP@k; macro-F1@k). SVM accuracy is
    added when it was run."""
    ks = report.parameters["k"]
    kmax = ks[-1]
    protocol = get_protocol(report.parameters.get("protocol"))
    if protocol.name == "retccl":
        keys = [("overall", f"acc@{k}") for k in ks] + [("overall", f"{x}@{kmax}") for x in ("mv", "mmv", "map")]
        head = ["Encoder"] + [f"Acc@{k}" for k in ks] + [f"MV@{kmax}", f"mMV@{kmax}", f"mAP@{kmax}"]
    else:
        names = list((report.results[0].metrics.get("protocol") or {}).get("figures", {})) if report.results else []
        keys = [("protocol", n) for n in names]
        head = ["Encoder"] + [_figure_head(n) for n in names]
    with_svm = any(r.svm for r in report.results)
    if with_svm:
        head.append("SVM acc")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.results:
        name = r.info["name"] + (" (random weights)" if r.info["random"] and "random" not in r.info["name"] else "")
        values = {"overall": r.metrics["overall"], "protocol": (r.metrics.get("protocol") or {}).get("figures", {})}
        cells = [name] + [f"{100 * values[where][key]:.2f}" for where, key in keys]
        if with_svm:
            cells.append(f"{100 * r.svm['accuracy']:.2f}" if r.svm else "-")
        lines.append("| " + " | ".join(cells) + " |")
    counts = report.dataset.counts()
    lines.append("")
    lines.append(
        f"{report.dataset.kind} data set {report.dataset.root}: {counts['items']} patches, {counts['classes']} classes"
        + (f", {counts['slides']} slides" if counts["slides"] else "")
        + f"; leave-one-out, {report.parameters['exclusion_text']}."
    )
    lines.append(f"Protocol: {protocol.name}, {protocol.title} ({protocol.source}).")
    mismatch = exclusion_note(protocol.name, report.parameters["exclusion"])
    if mismatch:
        lines.append(f"Note: {mismatch}.")
    lines.extend(f"Note: {note}." for note in report.dataset.notes)
    lines.extend(f"Note: {note}." for note in grid_notes(report))
    short = [r.info["name"] for r in report.results if r.metrics["queries_short_of_k"]]
    if short:
        lines.append(
            f"Some queries had fewer than {kmax} results left after the exclusion ({', '.join(short)}); missing results count as wrong."
        )
    return "\n".join(lines)


def grid_notes(report: BenchmarkReport) -> list[str]:
    """With several encoders, all embed the same patches; say so when one of them was trained
    at another resolution than the patches are cut at (a card's `mpp`)."""
    if len(report.results) < 2:
        return []
    mpp = report.parameters.get("mpp")
    at = f"{mpp:g} um/px" if mpp else f"whole patches resized to {report.parameters['tile_px']} px"
    other = [
        f"{r.info['name']} ({r.info['native_mpp']:g} um/px)"
        for r in report.results
        if r.info.get("native_mpp") is not None and (mpp is None or abs(r.info["native_mpp"] - mpp) > 1e-9)
    ]
    note = f"every encoder embeds the same patches and split ({at})"
    if other and mpp:
        note += "; trained at another resolution: " + ", ".join(other)
    return [note]


def write_json(report: BenchmarkReport, path: Path) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(report.to_json(), indent=1))
    return path


def write_plot(report: BenchmarkReport, path: Path) -> Path:
    """Left: MV@kmax per class, one bar per encoder; right: Acc@k and MV@k against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kmax = report.parameters["k"][-1]
    classes = report.dataset.classes
    n_enc = len(report.results)
    fig, (bars, curve) = plt.subplots(
        1, 2, figsize=(max(10, 0.7 * len(classes) * max(1, n_enc) + 6), 4.8), gridspec_kw={"width_ratios": [2, 1]}
    )
    x = np.arange(len(classes))
    width = 0.8 / n_enc
    for i, r in enumerate(report.results):
        per_class = r.metrics["per_class"]
        values = [100 * per_class[c][f"mv@{kmax}"] if c in per_class else 0.0 for c in classes]
        drawn = bars.bar(x + (i - (n_enc - 1) / 2) * width, values, width, label=r.info["name"])
        bars.bar_label(drawn, fmt="%.0f", fontsize=7)
        c = r.metrics["curve"]
        line = curve.plot(c["k"], [100 * v for v in c["acc"]], marker="o", label=f"{r.info['name']} Acc@k")[0]
        curve.plot(
            c["k"],
            [100 * v for v in c["mv"]],
            marker="s",
            linestyle="--",
            color=line.get_color(),
            label=f"{r.info['name']} MV@k",
        )
    bars.set_xticks(x, [c if len(c) <= 22 else c[:21] + "…" for c in classes], rotation=35, ha="right")
    bars.set_ylabel(f"MV@{kmax} (%)")
    bars.set_ylim(0, 107)  # room for the value labels above full bars
    bars.set_title(f"MV@{kmax} per class ({report.dataset.kind}, exclude {report.parameters['exclusion']})")
    bars.legend(fontsize="small")
    curve.set_xlabel("k")
    curve.set_ylabel("%")
    curve.set_ylim(0, 100)
    curve.set_xticks(range(1, kmax + 1))
    curve.set_title("Acc@k and MV@k")
    curve.legend(fontsize="x-small")
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
