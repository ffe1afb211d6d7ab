"""Slide-level retrieval benchmark over the indexed archive (`engine benchmark --archive`).

Every indexed slide with a label (a catalog column such as diagnosis, site or label, or a key
of its `extra` metadata) is a slide query against the rest, through the public search API
(`SearchEngine.search_slide`), as SISH and Yottixel evaluate slide search. Results from the
query's own patient (default; its own slide with `exclusion="slide"`) and unlabelled slides
are dropped; the search is asked for enough extra results to make up for them. Scored with
the metrics of engine.evaluation.metrics: MV@k, mMV@k, mAP@k, macro-F1@k, per class, plus
each peer protocol's figures, and the query time (p50, p95) beside the published anchors.
The report has the shape of the patch benchmark's, so its plot and catalog run work alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engine.config import Settings
from engine.errors import DatasetError
from engine.evaluation.benchmark import BenchmarkReport, EncoderResult
from engine.evaluation.datasets import Item, LabelledSet
from engine.evaluation.metrics import (
    MISSING,
    encode_labels,
    f1_per_class,
    hits_at_k,
    macro_f1_at_k,
    majority_at_k,
    retrieval_metrics,
)
from engine.evaluation.protocols import PROTOCOLS, get_protocol, protocol_figures

# Published per-query times of slide search (as the papers report them; other archives and
# hardware, so a guide to the order of magnitude only).
PUBLISHED_QUERY_S = {"RetCCL": 125.0, "SISH": 18.0, "Yottixel": 0.15}
SLIDE_COLUMNS = ("diagnosis", "site", "label", "collection")
SLIDE_EXCLUSIONS = ("slide", "patient")


@dataclasses.dataclass(frozen=True)
class SlideBenchmarkOptions:
    ks: tuple[int, ...] = (1, 3, 5)
    label_column: str = "diagnosis"
    exclusion: str = "patient"
    protocol: str = "retccl"


def labelled_slides(catalog_url: str, label_column: str) -> tuple[list[Item], int]:
    """(one Item per indexed slide with a label, number of indexed slides without one).
    Item.key / .slide: the slide id; .patient: its patient (None when unknown)."""
    from sqlalchemy import select

    from engine.catalog.db import Catalog
    from engine.catalog.models import INDEXED, Slide

    catalog = Catalog(catalog_url)
    try:
        with catalog.session() as s:
            rows = s.execute(
                select(Slide.id, Slide.path, Slide.patient, Slide.extra, *(getattr(Slide, c) for c in SLIDE_COLUMNS))
                .where(Slide.status == INDEXED)
                .order_by(Slide.id)
            ).all()
    finally:
        catalog.dispose()
    items, unlabelled = [], 0
    for row in rows:
        value = getattr(row, label_column) if label_column in SLIDE_COLUMNS else (row.extra or {}).get(label_column)
        if value in (None, ""):
            unlabelled += 1
            continue
        items.append(
            Item(key=str(row.id), label=str(value), path=Path(row.path), slide=str(row.id), patient=row.patient or None)
        )
    return items, unlabelled


def _groups(items: Sequence[Item], exclusion: str) -> tuple[np.ndarray, int]:
    """Exclusion group per slide; a slide without a patient is its own group. Returns (groups,
    slides without a patient)."""
    codes: dict[str, int] = {}
    groups, no_patient = [], 0
    for item in items:
        key = item.patient if exclusion == "patient" and item.patient else f"slide:{item.slide}"
        no_patient += exclusion == "patient" and not item.patient
        groups.append(codes.setdefault(key, len(codes)))
    return np.array(groups, np.int64), no_patient


def neighbour_rows(
    ranked_ids: Sequence[Sequence[int]], items: Sequence[Item], groups: np.ndarray, kmax: int
) -> np.ndarray:
    """(n, kmax) row numbers of each query's first kmax results that are labelled slides outside
    its group, in rank order; -1 where fewer remain."""
    row_of = {int(item.slide): i for i, item in enumerate(items)}
    out = np.full((len(items), kmax), -1, np.int64)
    for q, ids in enumerate(ranked_ids):
        kept = [row_of[i] for i in ids if i in row_of and groups[row_of[i]] != groups[q]][:kmax]
        out[q, : len(kept)] = kept
    return out


def score_slides(labels: Sequence[str], rows: np.ndarray, ks: Sequence[int], protocol: str) -> dict:
    """Metrics of the neighbour rows (see neighbour_rows) for labels of the queries."""
    ks = sorted(set(int(k) for k in ks))
    kmax = ks[-1]
    codes, classes = encode_labels(list(labels))
    neigh = np.where(rows >= 0, codes[np.maximum(rows, 0)], MISSING)
    result = retrieval_metrics(codes, neigh, ks, classes)
    for k in ks:
        result["overall"][f"macro_f1@{k}"] = macro_f1_at_k(codes, neigh, k)
    for c, f1 in f1_per_class(codes, majority_at_k(neigh, kmax)).items():
        result["per_class"][classes[c]][f"f1@{kmax}"] = f1
    result["curve"] = {
        "k": list(range(1, kmax + 1)),
        "acc": [float(hits_at_k(codes, neigh, k).mean()) for k in range(1, kmax + 1)],
        "mv": [float((majority_at_k(neigh, k) == codes).mean()) for k in range(1, kmax + 1)],
    }
    result["protocol"] = {"name": get_protocol(protocol).name, "figures": protocol_figures(protocol, codes, neigh, ks)}
    result["protocols"] = {name: protocol_figures(name, codes, neigh, ks) for name in PROTOCOLS}
    result["queries_short_of_k"] = int((rows[:, -1] < 0).sum())
    result["queries_without_results"] = int((rows[:, 0] < 0).sum())
    return result


def query_time(seconds: Sequence[float]) -> dict:
    t = np.asarray(seconds, np.float64)
    return {
        "queries": int(t.size),
        "p50_s": float(np.percentile(t, 50)),
        "p95_s": float(np.percentile(t, 95)),
        "mean_s": float(t.mean()),
        "published_s": dict(PUBLISHED_QUERY_S),
    }


def run_slide_benchmark(
    settings: Settings, opts: SlideBenchmarkOptions, *, engine=None, progress: Callable[[int, int], None] | None = None
) -> BenchmarkReport:
    """Query every labelled indexed slide against the others; a BenchmarkReport of kind
    "archive" (one encoder: the archive's)."""
    from sqlalchemy.engine import make_url

    if opts.exclusion not in SLIDE_EXCLUSIONS:
        raise DatasetError(f"--exclude must be slide or patient for the archive benchmark, not {opts.exclusion!r}")
    ks = sorted(set(int(k) for k in opts.ks))
    items, unlabelled = labelled_slides(settings.catalog_url, opts.label_column)
    root = make_url(settings.catalog_url).render_as_string(hide_password=True)
    if len(items) < 2:
        raise DatasetError(
            f"the archive benchmark needs at least 2 indexed slides with a {opts.label_column!r}; the catalog {root} has {len(items)}"
        )
    dataset = LabelledSet("archive", root, items, label_column=opts.label_column)
    if unlabelled:
        dataset.notes.append(f"{unlabelled} indexed slides without a {opts.label_column!r} value left out")
    groups, no_patient = _groups(items, opts.exclusion)
    if no_patient:
        dataset.notes.append(f"{no_patient} slides have no patient: for them only the slide itself is excluded")
    if engine is None:
        from engine.search import SearchEngine

        engine = SearchEngine(settings)
    total = len(items) + unlabelled
    sizes = np.bincount(groups)
    ranked, seconds = [], []
    t_all = time.perf_counter()
    for q, item in enumerate(items):
        # enough results for the top kmax after dropping the query's group and unlabelled slides
        want = min(max(total - 1, 1), ks[-1] + int(sizes[groups[q]]) - 1 + unlabelled)
        t0 = time.perf_counter()
        result = engine.search_slide(int(item.slide), top_k=want, exclude_self=True)
        seconds.append(time.perf_counter() - t0)
        ranked.append([int(hit.slide["id"]) for hit in sorted(result.results, key=lambda h: h.rank)])
        if progress:
            progress(q + 1, len(items))
    metrics = score_slides(dataset.labels, neighbour_rows(ranked, items, groups, ks[-1]), ks, opts.protocol)
    metrics["search_s"] = time.perf_counter() - t_all
    metrics["query_time"] = query_time(seconds)
    info = engine.encoder.info
    parameters = {
        "protocol": get_protocol(opts.protocol).name,
        "k": ks,
        "exclusion": opts.exclusion,
        "exclusion_text": f"results from the query's own {opts.exclusion} are excluded",
        "level": "slide",
        "label_column": opts.label_column,
        # the grid the archive was indexed at (its encoder row), not the settings' default
        "tile_px": int(getattr(engine, "tile_px", settings.tile_px)),
        "target_mpp": float(getattr(engine, "index_mpp", settings.target_mpp)),
        "precision": settings.precision,
        "tie_rule": "MV ties go to the label of the best-ranked result among the tied labels; ranking as SearchEngine.search_slide returns it",
        "map_definition": "AP@k = mean of precision@i over the relevant ranks i <= k (0 when none); mAP@k = mean over queries; sish: (1/k) x sum",
    }
    result = EncoderResult(
        info={
            "name": info.name,
            "architecture": info.architecture,
            "sha256": info.checkpoint_sha256,
            "dim": info.dim,
            "random": info.is_random,
            "spec": settings.encoder,
        },
        metrics=metrics,
        svm=None,
        cached=True,
        embed_s=0.0,
    )
    return BenchmarkReport(
        dataset, parameters, [result], dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    )


def slide_table(report: BenchmarkReport) -> str:
    """MV@k, mMV, mAP and macro-F1 at the largest k, a per-class table and the query time."""
    ks = report.parameters["k"]
    kmax = ks[-1]
    r = report.results[0]
    m = r.metrics["overall"]
    head = ["Encoder"] + [f"MV@{k}" for k in ks] + [f"mMV@{kmax}", f"mAP@{kmax}", f"macro-F1@{kmax}"]
    cells = (
        [r.info["name"]]
        + [f"{100 * m[f'mv@{k}']:.2f}" for k in ks]
        + [f"{100 * m[key]:.2f}" for key in (f"mmv@{kmax}", f"map@{kmax}", f"macro_f1@{kmax}")]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |", ""]
    lines += ["| Class | Slides | " + f"MV@{kmax} | mAP@{kmax} | F1@{kmax} |", "|---|---|---|---|---|"]
    for name, row in sorted(r.metrics["per_class"].items()):
        lines.append(
            f"| {name} | {row['count']} | {100 * row[f'mv@{kmax}']:.2f} | {100 * row[f'map@{kmax}']:.2f} | {100 * row.get(f'f1@{kmax}', 0.0):.2f} |"
        )
    counts = report.dataset.counts()
    t = r.metrics["query_time"]
    published = ", ".join(f"{name} ~{s:g} s" for name, s in t["published_s"].items())
    protocol = get_protocol(report.parameters["protocol"])
    figures = ", ".join(f"{key} {100 * value:.2f}" for key, value in r.metrics["protocol"]["figures"].items())
    lines += [
        "",
        f"archive {report.dataset.root}: {counts['items']} slides ({counts['patients']} patients), {counts['classes']} classes of {report.parameters['label_column']!r}; every slide a query, {report.parameters['exclusion_text']}.",
        f"Protocol: {protocol.name}, {protocol.title} ({protocol.source}): {figures}.",
        f"Query time per slide: p50 {t['p50_s']:.3f} s, p95 {t['p95_s']:.3f} s over {t['queries']} queries (published: {published} per query; other archives and hardware).",
    ]
    lines.extend(f"Note: {note}." for note in report.dataset.notes)
    if r.metrics["queries_short_of_k"]:
        lines.append(
            f"{r.metrics['queries_short_of_k']} queries had fewer than {kmax} results left after the exclusion; missing results count as wrong."
        )
    if r.metrics.get("queries_without_results"):
        lines.append(
            f"{r.metrics['queries_without_results']} queries had no result at all: every other labelled slide the search returned is of their own {report.parameters['exclusion']}"
            + (
                " (with one patient for the whole archive, --exclude slide is the only meaningful choice)"
                if counts["patients"] == 1
                else ""
            )
            + "."
        )
    return "\n".join(lines)
